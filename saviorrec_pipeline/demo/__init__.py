"""Demo raw data with planted ground truth: the embedded default's input."""

from saviorrec_pipeline.demo.generator import DemoSpec, DemoSummary, generate_demo

__all__ = ["DemoSpec", "DemoSummary", "generate_demo"]
