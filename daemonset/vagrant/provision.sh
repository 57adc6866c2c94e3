#!/usr/bin/env bash
# Provisions the Vagrant VM (see ../../Vagrantfile): k3s, the nodemesh image built in the VM,
# the agent's DaemonSet, two sample workloads and a policy, then checks that the mesh enforces
# the policy. Idempotent: `vagrant provision` re-runs it (and rebuilds the image).
set -euo pipefail

src=${NODEMESH_SRC:-/nodemesh}
channel=${NODEMESH_K3S_CHANNEL:-v1.31}
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$src/pyproject.toml")
image=localhost/nodemesh:$version
export KUBECONFIG=/etc/rancher/k3s/k3s.yaml
export DEBIAN_FRONTEND=noninteractive

step() { echo "==> $*"; }
die() { echo "provision: $*" >&2; exit 1; }

step "packages: buildah (builds the image), the running kernel's headers (BCC uses the host's)"
apt-get update -q
apt-get install -y -q --no-install-recommends curl ca-certificates buildah \
    "linux-headers-$(uname -r)" || die "apt-get install failed"

step "k3s ($channel channel), single node"
if ! command -v k3s > /dev/null; then
    curl -sfL https://get.k3s.io \
        | INSTALL_K3S_CHANNEL="$channel" INSTALL_K3S_EXEC="--disable=traefik --write-kubeconfig-mode=644" sh - \
        || die "k3s install failed: check the VM's network access to get.k3s.io"
fi
for _ in $(seq 60); do kubectl get nodes 2> /dev/null | grep -q ' Ready ' && break; sleep 5; done
kubectl get nodes | grep -q ' Ready ' || die "k3s node not Ready: journalctl -u k3s"

step "image $image (buildah), imported into k3s's containerd"
(cd "$src" && buildah bud --layers -f daemonset/image/Dockerfile -t "$image" .)
rm -f /tmp/nodemesh-image.tar
buildah push "$image" "docker-archive:/tmp/nodemesh-image.tar:$image"
k3s ctr -n k8s.io images import /tmp/nodemesh-image.tar
rm -f /tmp/nodemesh-image.tar

step "Istio security CRDs (stand-ins: this cluster has no Istio)"
kubectl apply -k "$src/daemonset/istio-crds"
kubectl wait --for=condition=Established --timeout=60s \
    crd/authorizationpolicies.security.istio.io crd/peerauthentications.security.istio.io

step "nodemesh DaemonSet"
kubectl apply -k "$src/daemonset/agent"
# A rebuilt image under the same tag: restart so the pods run it.
kubectl -n nodemesh-system rollout restart ds/nodemesh
if ! kubectl -n nodemesh-system rollout status ds/nodemesh --timeout=10m; then
    kubectl -n nodemesh-system logs ds/nodemesh --all-containers --tail=50 || true
    die "the agent did not become ready (logs above)"
fi

step "sample workloads and policy"
kubectl apply -k "$src/daemonset/samples"
kubectl -n demo rollout status deploy/server --timeout=5m
kubectl -n demo rollout status deploy/client --timeout=5m

step "check: client may reach server, an unlisted identity may not"
server_ip=$(kubectl -n demo get pod -l app=server -o jsonpath='{.items[0].status.podIP}')
fetch() {  # namespace pod-or-deploy: GET the server's page
    kubectl -n "$1" exec "$2" -- wget -q -T 5 -O - "http://$server_ip:8080/"
}
ok=0
for _ in $(seq 12); do  # enrollment and certificates take a moment after the pods start
    if fetch demo deploy/client | grep -q "hello from server"; then ok=1; break; fi
    sleep 5
done
[ "$ok" = 1 ] || die "client could not reach server through the mesh: kubectl -n nodemesh-system logs ds/nodemesh"
kubectl -n demo delete pod intruder --ignore-not-found --wait
kubectl -n demo run intruder --image=busybox:1.36 --restart=Never --command -- sleep infinity
kubectl -n demo wait --for=condition=Ready pod/intruder --timeout=2m
if fetch demo intruder > /dev/null 2>&1; then
    die "intruder (service account default) reached server: the policy is not enforced"
fi
kubectl -n demo delete pod intruder --wait=false

cat <<DONE
==> the mesh works: demo/client reaches demo/server, demo/intruder is refused.
    vagrant ssh, then:
      kubectl -n demo exec deploy/client -- wget -qO- http://$server_ip:8080/
      kubectl -n nodemesh-system logs ds/nodemesh
      kubectl -n nodemesh-system exec ds/nodemesh -- tail /var/log/nodemesh/audit.log
DONE
