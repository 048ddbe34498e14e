"""tessera's Ray launcher (python -m tessera_ray.launch) and the actor that hosts one worker."""
