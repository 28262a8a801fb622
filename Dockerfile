# kiln serve in a container. Build: docker build -t kiln .
# Run (the model is mounted, never baked in):
#   docker run --rm -p 8080:8080 -v $PWD/models:/models kiln \
#       serve --model /models/SmolLM2-135M-Instruct.Q4_1.gguf --host 0.0.0.0 --port 8080
# On a machine without a GPU the image's Mesa lavapipe driver runs the kernels on the CPU; with
# an NVIDIA GPU, run with `--gpus all` (the NVIDIA container toolkit provides the Vulkan ICD).
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY shaders shaders
COPY benches benches
RUN cargo build --release --bin kiln

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends mesa-vulkan-drivers libvulkan1 ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/kiln /usr/local/bin/kiln
USER 65534:65534
EXPOSE 8080
# /health is 503 while the model loads and while draining after SIGTERM, 200 when ready.
HEALTHCHECK --interval=10s --timeout=3s --start-period=120s CMD curl -fsS http://127.0.0.1:8080/health || exit 1
STOPSIGNAL SIGTERM
ENTRYPOINT ["kiln"]
CMD ["serve", "--model", "/models/model.gguf", "--host", "0.0.0.0", "--port", "8080"]
