"""The lab: experiments beside the paper, on the circles, each with its own CLI (LAB.md).

The core (the top-level modules) reproduces the paper; nothing in it imports this package. The lab
reuses the core's public functions (sample.setup / prepare / output_paths / save_samples,
evaluate.method_samples / summarize / metrics_of) and runs from the repository root:

    python -m lab.exact_score --run runs/circles   # §5.5 rows with the closed-form eps* and p*(y | x_t)
    python -m lab.score_error --run runs/circles   # how far the learned score is from eps* (§5.5, §7)
    python -m lab.composition --run runs/circles   # linear score composition (Bradley et al. 2025)
    python -m lab.smc --run runs/circles           # twisted SMC towards Eq. 2's product distribution
    python -m lab.extrapolate --run runs/mid       # §7: guiding out of a --bands middle run
    python -m lab.table                            # all of the above as one table
    python -m lab.interpolate --run runs/circles --out runs/circles/interp   # App. M
    python -m lab.edit --run runs/circles --out runs/circles/edit           # App. N
    python -m lab.synthetic_property --run runs/circles                    # App. E (rings; faces: green mouths)
"""
