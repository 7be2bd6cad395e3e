"""exchange: a multi-site medical records exchange over HL7 v2."""

__version__ = "0.1.0"
