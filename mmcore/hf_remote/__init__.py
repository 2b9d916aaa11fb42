"""Code that exported model folders carry for transformers' ``trust_remote_code`` loading;
it imports torch and transformers only (``mmcore.export.export_hf`` copies it)."""
