"""Memory planner: parameters, weight and KV-cache memory, and how a model fits on a device."""

from localmoe.planner.command import plan_command, plan_dict
from localmoe.planner.memory import Device, Plan, parse_device, plan_memory
from localmoe.planner.params import ParamCounts, count_params, kv_elements_per_token
from localmoe.planner.shape import ModelShape, PlanError, known_models, load_config, model_shape

__all__ = ["Device", "ModelShape", "ParamCounts", "Plan", "PlanError", "count_params", "known_models",
           "kv_elements_per_token", "load_config", "model_shape", "parse_device", "plan_command", "plan_dict",
           "plan_memory"]
