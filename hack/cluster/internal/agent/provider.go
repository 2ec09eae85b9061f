package agent

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log"
	"os"
	"sync"
	"time"

	dto "github.com/prometheus/client_model/go"
	"github.com/virtual-kubelet/virtual-kubelet/errdefs"
	"github.com/virtual-kubelet/virtual-kubelet/node/api"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	corev1listers "k8s.io/client-go/listers/core/v1"
	statsv1alpha1 "k8s.io/kubelet/pkg/apis/stats/v1alpha1"
)

// Config is the node agent's configuration (flags of recjob-node).
type Config struct {
	StateDir       string
	HostIP         string
	ClusterDomain  string
	RestartBackoff time.Duration
	MaxBackoff     time.Duration
	VolumeRefresh  time.Duration
}

// Provider implements virtual-kubelet's provider interface with local processes.
type Provider struct {
	client        kubernetes.Interface
	podLister     corev1listers.PodLister
	configMaps    corev1listers.ConfigMapLister
	secrets       corev1listers.SecretLister
	images        *Catalog
	network       *Network
	stateDir      string
	hostIP        string
	clusterDomain string

	restartBackoff, maxBackoff, volumeRefresh time.Duration

	log *log.Logger

	mu       sync.Mutex
	pods     map[types.UID]*podRuntime
	notify   func(*podRuntime)
	notifier func(*corev1.Pod)
}

// NewProvider makes the provider; listers come from virtual-kubelet's informers.
func NewProvider(cfg Config, client kubernetes.Interface, pods corev1listers.PodLister,
	configMaps corev1listers.ConfigMapLister, secrets corev1listers.SecretLister, images *Catalog,
	network *Network) *Provider {
	p := &Provider{client: client, podLister: pods, configMaps: configMaps, secrets: secrets, images: images, network: network,
		stateDir: cfg.StateDir, hostIP: cfg.HostIP, clusterDomain: cfg.ClusterDomain,
		restartBackoff: cfg.RestartBackoff, maxBackoff: cfg.MaxBackoff, volumeRefresh: cfg.VolumeRefresh,
		log: log.New(os.Stderr, "recjob-node: ", log.LstdFlags), pods: map[types.UID]*podRuntime{}}
	p.notify = p.sendStatus
	go p.resync()
	return p
}

// resync writes a pod's status again when the API server's copy disagrees with what the
// agent knows (e.g. the node controller marked it not ready while the node's lease could
// not be renewed), as a kubelet's periodic status sync does; virtual-kubelet itself only
// forwards changes the provider reports.
func (p *Provider) resync() {
	for range time.Tick(10 * time.Second) {
		p.mu.Lock()
		runtimes := make([]*podRuntime, 0, len(p.pods))
		for _, r := range p.pods {
			runtimes = append(runtimes, r)
		}
		p.mu.Unlock()
		for _, r := range runtimes {
			server, err := p.podLister.Pods(r.pod.Namespace).Get(r.pod.Name)
			if err != nil || server.UID != r.pod.UID || server.DeletionTimestamp != nil {
				continue
			}
			if server.Status.Phase == corev1.PodSucceeded || server.Status.Phase == corev1.PodFailed {
				continue
			}
			ours := r.status()
			if server.Status.Phase == ours.Phase && readyOf(server.Status) == readyOf(ours) {
				continue
			}
			update := server.DeepCopy()
			update.Status = ours
			if _, err := p.client.CoreV1().Pods(update.Namespace).UpdateStatus(context.Background(), update, metav1.UpdateOptions{}); err != nil {
				p.log.Printf("pod %s/%s: status resync: %v", update.Namespace, update.Name, err)
			}
		}
	}
}

func readyOf(status corev1.PodStatus) corev1.ConditionStatus {
	for _, c := range status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status
		}
	}
	return corev1.ConditionUnknown
}

func (p *Provider) sendStatus(r *podRuntime) {
	p.mu.Lock()
	notifier := p.notifier
	p.mu.Unlock()
	if notifier == nil {
		return
	}
	pod := r.pod.DeepCopy()
	pod.Status = r.status()
	notifier(pod)
}

// NotifyPods registers virtual-kubelet's callback for asynchronous status updates.
func (p *Provider) NotifyPods(_ context.Context, notifier func(*corev1.Pod)) {
	p.mu.Lock()
	p.notifier = notifier
	p.mu.Unlock()
}

// CreatePod starts the pod in the background; its status follows through NotifyPods.
func (p *Provider) CreatePod(_ context.Context, pod *corev1.Pod) error {
	p.mu.Lock()
	if _, ok := p.pods[pod.UID]; ok {
		p.mu.Unlock()
		return nil
	}
	p.mu.Unlock()
	pod = pod.DeepCopy()
	p.ensureMasterServiceEnv(pod)
	p.mu.Lock()
	if _, ok := p.pods[pod.UID]; ok {
		p.mu.Unlock()
		return nil
	}
	r := newPodRuntime(p, pod)
	p.pods[pod.UID] = r
	p.mu.Unlock()
	go r.run()
	return nil
}

// UpdatePod: a pod's spec is immutable but for images and tolerations; nothing to do.
func (p *Provider) UpdatePod(_ context.Context, _ *corev1.Pod) error { return nil }

// DeletePod stops the pod's containers within its grace period and removes its sandbox.
func (p *Provider) DeletePod(_ context.Context, pod *corev1.Pod) error {
	p.mu.Lock()
	r, ok := p.pods[pod.UID]
	p.mu.Unlock()
	if !ok {
		return errdefs.NotFoundf("pod %s/%s is not on this node", pod.Namespace, pod.Name)
	}
	grace := 30 * time.Second
	if pod.DeletionGracePeriodSeconds != nil {
		grace = time.Duration(*pod.DeletionGracePeriodSeconds) * time.Second
	} else if pod.Spec.TerminationGracePeriodSeconds != nil {
		grace = time.Duration(*pod.Spec.TerminationGracePeriodSeconds) * time.Second
	}
	go func() {
		r.stop(grace)
		p.notify(r)
		p.mu.Lock()
		delete(p.pods, pod.UID)
		p.mu.Unlock()
		_ = os.RemoveAll(r.dir + "/volumes")
	}()
	return nil
}

func (p *Provider) find(namespace, name string) *podRuntime {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, r := range p.pods {
		if r.pod.Namespace == namespace && r.pod.Name == name {
			return r
		}
	}
	return nil
}

// GetPod returns the pod with its current status.
func (p *Provider) GetPod(_ context.Context, namespace, name string) (*corev1.Pod, error) {
	r := p.find(namespace, name)
	if r == nil {
		return nil, errdefs.NotFoundf("pod %s/%s is not on this node", namespace, name)
	}
	pod := r.pod.DeepCopy()
	pod.Status = r.status()
	return pod, nil
}

// GetPodStatus returns the pod's current status.
func (p *Provider) GetPodStatus(ctx context.Context, namespace, name string) (*corev1.PodStatus, error) {
	pod, err := p.GetPod(ctx, namespace, name)
	if err != nil {
		return nil, err
	}
	return &pod.Status, nil
}

// GetPods lists the pods this node runs.
func (p *Provider) GetPods(ctx context.Context) ([]*corev1.Pod, error) {
	p.mu.Lock()
	runtimes := make([]*podRuntime, 0, len(p.pods))
	for _, r := range p.pods {
		runtimes = append(runtimes, r)
	}
	p.mu.Unlock()
	pods := make([]*corev1.Pod, 0, len(runtimes))
	for _, r := range runtimes {
		pod := r.pod.DeepCopy()
		pod.Status = r.status()
		pods = append(pods, pod)
	}
	return pods, nil
}

// GetContainerLogs serves `kubectl logs` from the container's log file.
func (p *Provider) GetContainerLogs(_ context.Context, namespace, podName, containerName string, opts api.ContainerLogOpts) (io.ReadCloser, error) {
	r := p.find(namespace, podName)
	if r == nil {
		return nil, errdefs.NotFoundf("pod %s/%s is not on this node", namespace, podName)
	}
	for _, c := range r.containers {
		if c.spec.Name == containerName {
			data, err := os.ReadFile(r.logPath(c))
			if err != nil {
				return nil, err
			}
			if opts.Tail > 0 {
				data = tail(data, opts.Tail)
			}
			if opts.LimitBytes > 0 && len(data) > opts.LimitBytes {
				data = data[len(data)-opts.LimitBytes:]
			}
			return io.NopCloser(bytesReader(data)), nil
		}
	}
	return nil, errdefs.NotFoundf("container %s not found in pod %s/%s", containerName, namespace, podName)
}

// RunInContainer is not offered by this node (kubectl exec).
func (p *Provider) RunInContainer(context.Context, string, string, string, []string, api.AttachIO) error {
	return fmt.Errorf("exec is not supported by the recjob node agent")
}

// AttachToContainer is not offered by this node.
func (p *Provider) AttachToContainer(context.Context, string, string, string, api.AttachIO) error {
	return fmt.Errorf("attach is not supported by the recjob node agent")
}

// GetStatsSummary is not offered by this node.
func (p *Provider) GetStatsSummary(context.Context) (*statsv1alpha1.Summary, error) {
	return nil, fmt.Errorf("stats are not supported by the recjob node agent")
}

// GetMetricsResource is not offered by this node.
func (p *Provider) GetMetricsResource(context.Context) ([]*dto.MetricFamily, error) {
	return nil, fmt.Errorf("metrics are not supported by the recjob node agent")
}

// PortForward is not offered by this node (pods are reachable on their IPs).
func (p *Provider) PortForward(context.Context, string, string, int32, io.ReadWriteCloser) error {
	return fmt.Errorf("port-forward is not supported by the recjob node agent")
}

// Shutdown stops every pod (the agent is going away).
func (p *Provider) Shutdown(grace time.Duration) {
	p.mu.Lock()
	runtimes := make([]*podRuntime, 0, len(p.pods))
	for _, r := range p.pods {
		runtimes = append(runtimes, r)
	}
	p.mu.Unlock()
	var wg sync.WaitGroup
	for _, r := range runtimes {
		wg.Add(1)
		go func(r *podRuntime) { defer wg.Done(); r.stop(grace) }(r)
	}
	wg.Wait()
}

func tail(data []byte, lines int) []byte {
	count := 0
	for i := len(data) - 1; i >= 0; i-- {
		if data[i] == '\n' && i != len(data)-1 {
			count++
			if count == lines {
				return data[i+1:]
			}
		}
	}
	return data
}

func bytesReader(data []byte) io.Reader { return bytes.NewReader(data) }
