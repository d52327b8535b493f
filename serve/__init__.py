"""Ray Serve applications (retrieval, generation, the clinician web page) and their config.yaml.

Built with the serving issue; the jobs that produce what they serve live in `jobs/`.
"""
