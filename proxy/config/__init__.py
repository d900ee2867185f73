"""Configuration: YAML file -> validated frozen dataclasses."""

from proxy.config.errors import ConfigError
from proxy.config.loader import load_config, parse_config
from proxy.config.model import Config

__all__ = ["Config", "ConfigError", "load_config", "parse_config"]
