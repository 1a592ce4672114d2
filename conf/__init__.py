"""talkfarm's Hydra config tree: config.yaml and one folder per config group.

A package so that Hydra finds it as `pkg://conf` wherever talkfarm is installed (editable or not);
the schema for every file here is the dataclasses in farm/config.py.
"""
