"""The files MLflow runs to load each registered model ("models from code"): each names its class."""
