"""gdpo_listener.envs"""
