"""Model assembly: a target model trained as K modules in independent runs, then joined (docs/methods.md)."""
