"""Data and metrics per task family: glue (the nine GLUE tasks and two offline WordNet tasks); nlg and
instruct come with their own issues."""
