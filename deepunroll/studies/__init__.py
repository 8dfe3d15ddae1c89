"""Reproduction studies: run(profile, out_dir) writes results/*.csv, results/*.md and figures/*.png."""
