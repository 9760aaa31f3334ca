"""Labelled image sets: the formats mcaudit reads and the dataset they all become."""
