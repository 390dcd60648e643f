"""Figures and reports: read rows and diagnoses, draw them."""
