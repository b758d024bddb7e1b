"""bench/scaling.py: the memory model of the loss step against a CPU measurement, and the tables' coverage."""
import bench.scaling as scaling


def test_model_matches_the_cpu_measurement_of_both_paths():
    rows = scaling.check()  # fresh worker processes, float32, torch backend, scaling.CHECK_SHAPE
    assert [name for name, *_ in rows] == ["logits path", "fused head"]
    for name, predicted, measured, ok in rows:
        assert measured > 0, f"{name}: nothing measured (the measurement would pass any model)"
        assert ok, (f"{name}: model {predicted / scaling.MIB:.1f} MiB vs measured {measured / scaling.MIB:.1f} MiB, "
                    f"outside {scaling.CHECK_RTOL:.0%} + {scaling.CHECK_ATOL // scaling.MIB} MiB")


def test_vocabulary_terms_shrink_with_tp_and_the_fused_head_never_holds_logits():
    h, v = scaling.MODELS["Cohere2Config"]
    one = scaling.loss_step_bytes(65536, h, v, 1, fused=False)
    eight = scaling.loss_step_bytes(65536, h, v, 8, fused=False)
    assert eight["logits"] * 8 >= one["logits"] > eight["logits"] * 7.99
    fused = scaling.loss_step_bytes(65536, h, v, 1, fused=True)
    assert "logits" not in fused and "dlogits" not in fused
    assert scaling.total(fused) < scaling.total(one) / 3


def test_tables_cover_every_model_token_count_and_tp():
    text = scaling.tables()
    for name in scaling.MODELS:
        assert f"### {name}" in text
    assert text.count("\n| ") - text.count("| tokens") == len(scaling.MODELS) * len(scaling.TOKENS) * len(scaling.TP)


def test_shapes_come_from_transformers_config_classes_and_fsdp_shrinks_only_the_resting_head():
    import transformers

    for name, (h, v) in scaling.MODELS.items():
        config = getattr(transformers, name)()
        assert (h, v) == (config.hidden_size, config.vocab_size)
    h, v = scaling.MODELS["Cohere2Config"]
    tp1, tp8 = scaling.head_bytes(h, v, tp=1), scaling.head_bytes(h, v, tp=8)
    assert tp1["peak"] > 7.99 * tp8["peak"]  # vocabulary-parallel: every rank holds 1/8 of the head and gradient
    two, many = scaling.head_bytes(h, v, fsdp=2), scaling.head_bytes(h, v, fsdp=64)
    assert two["rest"] > 31 * many["rest"]  # the resting shards shrink with FSDP
    assert many["peak"] > tp1["peak"]  # but the gathered head and its full gradient are there in the loss step
