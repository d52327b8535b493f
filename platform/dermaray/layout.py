"""Where every stage writes under a pipeline workdir (a local path or s3://...): the one definition the
pipeline, the report and the configs' defaults (`serve.*` included) read.

    <root>/synthetic/<domain>                   lesions in the ISIC 2024 layout (jobs.synth)
    <root>/ingest/<domain>/{lesions,quarantine} canonical table + quarantine (jobs.ingest)
    <root>/notes/<domain>                       notes as configured (jobs.notes)
    <root>/notes_blind/<domain>                 label-free template notes for the classifier
    <root>/grounding/{runs,model}               Ray Train runs and the grounded model
    <root>/embeddings/<model>/<domain>/{embeddings,index,thumbnails}   per-lesion embeddings, vector index, thumbnails
    <root>/classifier/{runs,model,image_projections}   the image + note classifier; its image projections of
                                                the lesions it read, indexed (what text search searches)
    <root>/diffusion/{base,runs,adapter,adapters/<code>}    pre-trained tiny base, LoRA runs and adapters
    <root>/reports/{grounding,diffusion}        evaluation tables (and grids)
    <root>/reports/{notes_study,classifier_notes_study}     the benchmarks' studies, when run
    <root>/reports/report.html                  the HTML report of all of the above
    <root>/pipeline_summary.json                per-stage results and seconds

Pure string work: no filesystem is touched, so a layout costs nothing to build anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_WORKDIR = "out"  # where `make run` writes, and what every stage's default paths point into
MAIN_DOMAIN = "clinic"  # the synthetic clinic everything trains on; its test split gives the held-out queries
SHIFTED_DOMAIN = "shifted"  # a second clinic with other imaging, for robustness checks

# Inside a stage's output folder.
MODEL = "model"  # grounding and classifier: the exported model (jobs.training)
EMBEDDINGS = "embeddings"  # embeddings: the Parquet table
INDEX = "index"  # embeddings: the vector index (dermaray.retrieval.VectorIndex)
THUMBNAILS = "thumbnails"  # embeddings: the lesions' thumbnails in the index's row order (dermaray.serving.thumbnails)
IMAGE_PROJECTIONS = "image_projections"  # classifier: a VectorIndex of its image projections of every lesion
DIFFUSION_BASE = "base"  # diffusion: the pre-trained tiny base
SHARED_ADAPTER = "adapter"  # diffusion: one adapter, every diagnosis, class captions
PER_DIAGNOSIS_ADAPTERS = "adapters"  # diffusion: adapters/<code>, one adapter per diagnosis


def join(uri: str, *parts: str) -> str:
    """`uri/part/...` with one slash between parts, for local paths and object storage alike."""
    return "/".join([uri.rstrip("/"), *(p.strip("/") for p in parts)])


def summary_name(stage: str) -> str:
    """The file a stage writes its summary to, in its output folder (and the pipeline's, in the workdir)."""
    return f"{stage}_summary.json"


def summary_uri(output: str, stage: str) -> str:
    return join(output, summary_name(stage))


def embeddings_table(output: str) -> str:
    """The embeddings Parquet under an embeddings job's output."""
    return join(output, EMBEDDINGS)


def embeddings_index(output: str) -> str:
    """The vector index under an embeddings job's output."""
    return join(output, INDEX)


def embeddings_thumbnails(output: str) -> str:
    """The thumbnails under an embeddings job's output."""
    return join(output, THUMBNAILS)


def _domain(domain: str | None) -> list[str]:
    return [domain] if domain else []


@dataclass(frozen=True)
class Layout:
    """Every stage's output under `root`, as the pipeline writes them. A per-domain stage's method without
    a domain gives the folder holding one output per domain."""

    root: str = DEFAULT_WORKDIR

    def uri(self, *parts: str) -> str:
        return join(self.root, *parts)

    def synthetic(self, domain: str | None = None) -> str:
        return self.uri("synthetic", *_domain(domain))

    def ingest(self, domain: str | None = None) -> str:
        return self.uri("ingest", *_domain(domain))

    def lesions(self, domain: str) -> str:
        return join(self.ingest(domain), "lesions")

    def notes(self, domain: str | None = None) -> str:
        return self.uri("notes", *_domain(domain))

    def notes_blind(self, domain: str | None = None) -> str:
        return self.uri("notes_blind", *_domain(domain))

    @property
    def grounding(self) -> str:
        return self.uri("grounding")

    @property
    def grounding_model(self) -> str:
        return join(self.grounding, MODEL)

    def embeddings(self, model: str, domain: str | None = None) -> str:
        """`model`: "frozen" or "grounded"."""
        return self.uri("embeddings", model, *_domain(domain))

    @property
    def grounding_eval(self) -> str:
        return self.uri("reports", "grounding")

    @property
    def classifier(self) -> str:
        return self.uri("classifier")

    @property
    def classifier_model(self) -> str:
        return join(self.classifier, MODEL)

    @property
    def classifier_projections(self) -> str:
        return join(self.classifier, IMAGE_PROJECTIONS)

    @property
    def diffusion(self) -> str:
        return self.uri("diffusion")

    @property
    def diffusion_eval(self) -> str:
        return self.uri("reports", "diffusion")

    @property
    def notes_study(self) -> str:
        return self.uri("reports", "notes_study")

    @property
    def classifier_notes_study(self) -> str:
        return self.uri("reports", "classifier_notes_study")

    @property
    def grounding_study(self) -> str:
        return self.uri("reports", "grounding_study")

    @property
    def report(self) -> str:
        return self.uri("reports", "report.html")

    @property
    def summary(self) -> str:
        return self.uri(summary_name("pipeline"))
