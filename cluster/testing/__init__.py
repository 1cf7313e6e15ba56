"""Test helpers for the serving layer: a fake engine that honours EngineProtocol without a model."""
