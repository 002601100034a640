"""Helpers of the geo-tagging stage: gazetteer matching, NLTK backend, coordinates, statistics."""
