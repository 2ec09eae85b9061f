// Command recjob-node is the RecJob test cluster's node agent: it registers a Node with
// the API server (virtual-kubelet's node and pod controllers) and runs each pod bound to
// it as local processes in namespaces of their own (see internal/agent).
package main

import (
	"context"
	"flag"
	"log"
	"net"
	"net/http"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"syscall"
	"time"

	"github.com/virtual-kubelet/virtual-kubelet/node"
	"github.com/virtual-kubelet/virtual-kubelet/node/nodeutil"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"recjob.dev/hack/cluster/internal/agent"
)

func main() {
	name := flag.String("name", "node-1", "Node name")
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig of the node's identity (system:node:<name>)")
	images := flag.String("images", "", "image catalog (JSON) written by make cluster")
	stateDir := flag.String("state-dir", "", "where pods' folders, volumes and logs live")
	bridge := flag.String("bridge", "recjob0", "cluster bridge")
	gateway := flag.String("gateway", "10.244.0.1", "host address on the bridge (also the node's InternalIP)")
	podCIDR := flag.String("pod-cidr", "10.244.1.0/24", "this node's pod addresses")
	mask := flag.Int("pod-network-prefix", 16, "prefix length of the whole pod network")
	port := flag.Int("port", 10250, "kubelet API port (logs), TLS")
	tlsCert := flag.String("tls-cert", "", "serving certificate of the kubelet API")
	tlsKey := flag.String("tls-key", "", "its key")
	clientCA := flag.String("client-ca", "", "CA of the API server's kubelet client certificate")
	cpu := flag.String("cpu", strconv.Itoa(runtime.NumCPU()*4), "allocatable CPU (pods share the host)")
	memory := flag.String("memory", "64Gi", "allocatable memory")
	pods := flag.String("pods", "110", "allocatable pods")
	backoff := flag.Duration("restart-backoff", 2*time.Second, "first container restart back-off (kubelet: 10s)")
	maxBackoff := flag.Duration("max-restart-backoff", time.Minute, "longest restart back-off (kubelet: 5m)")
	refresh := flag.Duration("volume-refresh", 10*time.Second, "ConfigMap/Secret/token volume refresh period")
	flag.Parse()

	restConfig, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		log.Fatalf("kubeconfig: %v", err)
	}
	restConfig.QPS, restConfig.Burst = 50, 100
	client, err := kubernetes.NewForConfig(restConfig)
	if err != nil {
		log.Fatalf("client: %v", err)
	}
	catalog, err := agent.LoadCatalog(*images)
	if err != nil {
		log.Fatalf("images: %v", err)
	}
	network, err := agent.NewNetwork(*bridge, *gateway, *podCIDR, *mask)
	if err != nil {
		log.Fatalf("network: %v", err)
	}
	if err := os.MkdirAll(*stateDir, 0o755); err != nil {
		log.Fatal(err)
	}

	var provider *agent.Provider
	newProvider := func(pc nodeutil.ProviderConfig) (nodeutil.Provider, node.NodeProvider, error) {
		provider = agent.NewProvider(agent.Config{
			StateDir: *stateDir, HostIP: *gateway, ClusterDomain: "cluster.local",
			RestartBackoff: *backoff, MaxBackoff: *maxBackoff, VolumeRefresh: *refresh,
		}, client, pc.Pods, pc.ConfigMaps, pc.Secrets, catalog, network)
		n := pc.Node
		// NodeRestriction: a node may not set kubernetes.io/role (virtual-kubelet's default)
		delete(n.Labels, "kubernetes.io/role")
		n.Labels["kubernetes.io/os"] = "linux"
		n.Labels["kubernetes.io/arch"] = runtime.GOARCH
		n.Labels["node.kubernetes.io/instance-type"] = "recjob-local"
		n.Spec.PodCIDR, n.Spec.PodCIDRs = *podCIDR, []string{*podCIDR}
		resources := corev1.ResourceList{
			corev1.ResourceCPU:              resource.MustParse(*cpu),
			corev1.ResourceMemory:           resource.MustParse(*memory),
			corev1.ResourcePods:             resource.MustParse(*pods),
			corev1.ResourceEphemeralStorage: resource.MustParse("100Gi"),
		}
		n.Status.Capacity, n.Status.Allocatable = resources, resources
		n.Status.Addresses = []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: *gateway},
			{Type: corev1.NodeHostName, Address: *name},
		}
		n.Status.DaemonEndpoints.KubeletEndpoint.Port = int32(*port)
		n.Status.NodeInfo = corev1.NodeSystemInfo{
			OperatingSystem: "linux", Architecture: runtime.GOARCH,
			KubeletVersion: "v1.37.2", ContainerRuntimeVersion: "recjob-node://0.1.0",
		}
		for i, c := range n.Status.Conditions {
			if c.Type != corev1.NodeReady {
				n.Status.Conditions[i].Status = corev1.ConditionFalse
				n.Status.Conditions[i].Reason = "AgentHasNo" + string(c.Type)
			}
		}
		return provider, nil, nil
	}

	mux := http.NewServeMux()
	opts := []nodeutil.NodeOpt{
		nodeutil.WithClient(client),
		func(cfg *nodeutil.NodeConfig) error {
			cfg.HTTPListenAddr = net.JoinHostPort(*gateway, strconv.Itoa(*port))
			cfg.Handler = mux
			cfg.NumWorkers = 4
			return nil
		},
		nodeutil.AttachProviderRoutes(mux),
	}
	if *tlsCert != "" {
		opts = append(opts, nodeutil.WithTLSConfig(nodeutil.WithKeyPairFromPath(*tlsCert, *tlsKey), nodeutil.WithCAFromPath(*clientCA)))
	}
	n, err := nodeutil.NewNode(*name, newProvider, opts...)
	if err != nil {
		log.Fatalf("node: %v", err)
	}

	ctx, cancel := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer cancel()
	go func() {
		if err := n.Run(ctx); err != nil && ctx.Err() == nil {
			log.Fatalf("node %s: %v", *name, err)
		}
	}()
	if err := n.WaitReady(ctx, 2*time.Minute); err != nil {
		log.Fatalf("node %s not ready: %v", *name, err)
	}
	log.Printf("node %s ready (pods %s, kubelet API %s:%d)", *name, *podCIDR, *gateway, *port)
	<-ctx.Done()
	log.Printf("node %s stopping its pods", *name)
	provider.Shutdown(5 * time.Second)
}
