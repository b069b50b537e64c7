# MinIO from source at the pinned pseudo-version (the same one `detectflow stack up` builds).
FROM golang:1.26-bookworm AS build
ARG MINIO_VERSION
ENV CGO_ENABLED=0 GOFLAGS=-buildvcs=false
RUN go install github.com/minio/minio@${MINIO_VERSION}

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends curl ca-certificates \
    && rm -rf /var/lib/apt/lists/* && useradd --system --uid 1000 minio && mkdir /data && chown minio /data
COPY --from=build /go/bin/minio /usr/local/bin/minio
USER minio
EXPOSE 9000 9001
ENTRYPOINT ["/usr/local/bin/minio"]
