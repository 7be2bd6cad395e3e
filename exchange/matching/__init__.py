"""Patient matching core (placeholder docstring, completed below)."""
