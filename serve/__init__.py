"""Ray Serve applications (retrieval, generation, the clinician web page) and their config.yaml.

The jobs that produce what they serve live in `jobs/`.
"""
