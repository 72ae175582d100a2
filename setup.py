"""dit_jax: Diffusion Transformers (DiT) in JAX/Flax, exact to the official PyTorch code."""
import setuptools

setuptools.setup(
    name="dit_jax",
    version="0.1.0",
    description="Diffusion Transformers (Peebles & Xie 2023) in JAX/Flax for TPU and GPU.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=setuptools.find_packages(include=["dit_jax", "dit_jax.*"]),
    # jax/jaxlib 0.10.2, flax 0.12.8 and orbax-checkpoint 0.12.8 require Python >= 3.11 (their
    # metadata's Requires-Python); the TPU VM images ship 3.10: launch/tpu_install.sh makes a
    # 3.11 environment.
    python_requires=">=3.11",
    # The stack the tests pass on, pinned (jax/flax/orbax change APIs between minor releases).
    install_requires=[
        "jax==0.10.2",
        "jaxlib==0.10.2",
        "flax==0.12.8",
        "optax==0.2.8",
        "orbax-checkpoint==0.12.8",
        "tensorflow-datasets==4.9.10",
        "ml-collections==1.1.0",
        "numpy>=2.0",
        "pillow>=10.0",
        "scikit-learn>=1.3",
        "tensorboardX>=2.6",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "absl-py>=2.0",
    ],
    extras_require={
        # Reading official `.pt` checkpoints (torch.load(weights_only=True)).
        "torch": ["torch==2.13.0"],
        # The ImageNet path: tfds image readers need TensorFlow.
        "imagenet": ["tensorflow-cpu>=2.16"],
        # gs:// workdirs and data on Cloud TPU: etils.epath (configs, grids, samples, Orbax's
        # directories) through gcsfs, tensorboardX's event files through google-cloud-storage;
        # Orbax's arrays go through tensorstore, which speaks GCS itself.
        "gcs": ["gcsfs>=2024.2", "google-cloud-storage>=2.14"],
        # The gs:// test runs training against a local GCS emulator.
        "test": ["pytest>=8.0", "torch==2.13.0", "gcsfs>=2024.2", "google-cloud-storage>=2.14",
                 "gcp-storage-emulator>=2024.8", "diffusers==0.42.1"],
    },
)
