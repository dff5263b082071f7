"""jaxvlm: JAX/Flax vision-language models for research at pod scale."""
__version__ = "0.1.0"
