"""Prefect flows (thin): ``experiment`` (one cell), ``ablation`` (the four methods and the Switch
pair), ``sweep`` (a YAML grid under one parent run) and the ``nightly`` deployment."""
