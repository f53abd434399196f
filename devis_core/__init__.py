"""DeVIS workbench: configuration, models, data, tracking, evaluation and notebook tools."""

__version__ = "0.1.0"
