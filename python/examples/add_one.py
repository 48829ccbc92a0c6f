"""Adds 1.0 to every weight each round: the exact-arithmetic check, as an external learner."""

import flare_client as flare

flare.init()
while flare.is_running():
    model = flare.receive()
    if model is None:
        break
    if flare.is_evaluate():
        flare.send(flare.FLModel(metrics={"round": float(model.current_round)}))
        continue
    params = {name: t + 1.0 for name, t in model.params.items()}
    flare.send(flare.FLModel(params=params, metrics={"round": float(model.current_round)},
                             meta={"num_samples": 7}))
