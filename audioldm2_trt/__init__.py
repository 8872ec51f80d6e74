"""AudioLDM 2 exported and accelerated: `audioldm2_trt.export` builds, `audioldm2_trt.runtime` runs."""

__version__ = "0.1.0"
