"""What a run is asked to do, checked at the boundary: every bad value one clear InputError.

    values.py   value parsers (sizes, numbers, scales, URLs, schedules, ...)
    options.py  the options table (OPTIONS: keys, flags, API keywords) and RunOptions
    recipe.py   Recipe, and build_recipe from a mapping
    files.py    recipe files: raymerge's YAML and mergekit's configurations
    mergekit.py mergekit configurations as raymerge recipes
"""

from raymerge.config.files import load_recipe_file
from raymerge.config.options import OPTION, OPTIONS, Option, RunOptions, ScaleRuleAction, recipe_from_flags
from raymerge.config.recipe import Recipe, build_recipe
from raymerge.config.values import (parse_count, parse_dtype, parse_number, parse_scale, parse_size,
                                    parse_storage_options)

__all__ = ["OPTION", "OPTIONS", "Option", "Recipe", "RunOptions", "ScaleRuleAction", "build_recipe", "load_recipe_file",
           "parse_count", "parse_dtype", "parse_number", "parse_scale", "parse_size", "parse_storage_options",
           "recipe_from_flags"]
