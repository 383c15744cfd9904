"""fedretain: privacy-preserving federated retention analytics for short-video e-commerce."""

__version__ = "0.1.0"
