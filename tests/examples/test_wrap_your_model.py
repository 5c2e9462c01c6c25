def test_wrap_your_model_smoke(example):
    mod = example("wrap_your_model")
    out = mod.main(
        ["--train-steps", "40", "--sample-steps", "10", "--num-samples", "16", "--timesteps", "100"]
    )
    assert out["final_loss"] < out["first_loss"]
    assert out["distance_error"] == out["distance_error"]  # finite, not NaN
