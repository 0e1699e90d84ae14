"""Hugging Face interop: the architecture and weight-name mapping (:mod:`.format`), importing
``transformers`` checkpoints as teachers (:mod:`.importer`), exporting ours (:mod:`.exporter`)."""
