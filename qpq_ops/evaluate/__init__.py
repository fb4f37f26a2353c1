"""Evaluate the scaling triggers against a Prometheus or a directly scraped /metrics page."""
