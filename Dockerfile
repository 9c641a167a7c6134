# The csi-kit driver image: one process that serves CSI and runs the Kubernetes
# loops (see examples/deploy/<driver>/daemonset.yaml).
#
#   docker build -t csi-kit:0.1.0 .
#
# Two stages: the first builds the wheel (setup.py generates csi_kit/_pb from
# proto/ with the pinned grpcio-tools), the second installs it with only the
# system tools the built-in backends run.  The base is pinned to an exact
# Python release and Debian suite (tests/unit/test_dockerfile.py checks that
# it is never a floating tag); pin it by digest too for reproducible builds.

FROM python:3.11.7-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml setup.py setup.cfg README.md ./
COPY proto/ proto/
COPY csi_kit/ csi_kit/
COPY backends/ backends/
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11.7-slim-bookworm
# util-linux/mount: mount, blkid, loop ioctls' sysfs; e2fsprogs: mkfs.ext4, resize2fs,
# e2fsck; xfsprogs: mkfs.xfs, xfs_growfs; lvm2 + thin-provisioning-tools: the LVM backend.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        util-linux mount e2fsprogs xfsprogs lvm2 thin-provisioning-tools \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links=/wheels csi-kit && rm -rf /wheels
ENTRYPOINT ["csi-kit"]
CMD ["serve", "--help"]
