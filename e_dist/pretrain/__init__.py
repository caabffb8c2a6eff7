"""The main job: large-batch GPT pretraining with ALTO on DeepSpeed or FSDP.

It uses only e_dist's public API, as a user's training script would.
"""
