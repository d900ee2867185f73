"""Canary analysis: sliding windows, the verdict, the rollout state machine and its controller.

The pure parts (`window`, `verdict`, `rollout`) are functions of (state, observations, now); the
controller is the only place with a clock, a timer, files and a webhook.
"""
