from fltool.config.load import config_from_dict, config_to_dict, dump_config, load_config
from fltool.config.schema import Config

__all__ = ["Config", "config_from_dict", "config_to_dict", "dump_config", "load_config"]
