import pytest

# A training configuration small enough for a CPU test: 16 px crops, a 2-block ViT, 16 steps per epoch.
TINY = ["--dataset", "synthetic", "--synthetic_size", "512", "--global_crops_size", "16", "--local_crops_size", "8",
        "--local_crops_number", "2", "--blur_sigma", "0.1", "0.5", "--arch", "custom", "--patch_size", "4",
        "--embed_dim", "32", "--depth", "2", "--num_heads", "2", "--drop_path_rate", "0.1",
        "--head_hidden_dim", "64", "--bottleneck_dim", "32", "--class_memory_size", "256", "--patch_memory_size", "128",
        "--class_anchors", "32", "--class_neighbors", "2", "--class_draws", "2", "--patch_anchors", "16",
        "--batch_size_per_gpu", "32", "--epochs", "2", "--warmup_epochs", "1", "--warmup_teacher_temp_epochs", "1",
        "--lr", "1e-3", "--log_every", "4", "--knn_every", "1", "--device", "cpu"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """Output directory of one finished 2-epoch tiny run (shared by the end-to-end and evaluation tests)."""
    import train
    out = tmp_path_factory.mktemp("tiny_run")
    trainer = train.main(TINY + ["--output_dir", str(out)])
    return out, trainer
