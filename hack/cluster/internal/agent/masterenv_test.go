package agent

import (
	"log"
	"os"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
)

func apiService() *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: "kubernetes"},
		Spec: corev1.ServiceSpec{
			ClusterIP: "10.96.0.1",
			Ports:     []corev1.ServicePort{{Name: "https", Port: 443, Protocol: corev1.ProtocolTCP}},
		},
	}
}

func env(c corev1.Container) map[string]string {
	out := map[string]string{}
	for _, e := range c.Env {
		out[e.Name] = e.Value
	}
	return out
}

// A pod that virtual-kubelet passed without the API server's variables gets a kubelet's;
// one that has them keeps its own values.
func TestMissingMasterServiceEnvIsFilledLikeAKubelet(t *testing.T) {
	p := &Provider{client: fake.NewSimpleClientset(apiService()), log: log.New(os.Stderr, "", 0)}
	pod := &corev1.Pod{Spec: corev1.PodSpec{
		InitContainers: []corev1.Container{{Name: "init"}},
		Containers: []corev1.Container{
			{Name: "bare", Env: []corev1.EnvVar{{Name: "A", Value: "1"}}},
			{Name: "resolved", Env: []corev1.EnvVar{{Name: "KUBERNETES_SERVICE_HOST", Value: "10.0.0.9"}}},
		},
	}}
	p.ensureMasterServiceEnv(pod)
	want := map[string]string{
		"A":                             "1",
		"KUBERNETES_SERVICE_HOST":       "10.96.0.1",
		"KUBERNETES_SERVICE_PORT":       "443",
		"KUBERNETES_SERVICE_PORT_HTTPS": "443",
		"KUBERNETES_PORT":               "tcp://10.96.0.1:443",
		"KUBERNETES_PORT_443_TCP":       "tcp://10.96.0.1:443",
		"KUBERNETES_PORT_443_TCP_PROTO": "tcp",
		"KUBERNETES_PORT_443_TCP_PORT":  "443",
		"KUBERNETES_PORT_443_TCP_ADDR":  "10.96.0.1",
	}
	got := env(pod.Spec.Containers[0])
	for k, v := range want {
		if got[k] != v {
			t.Errorf("container bare: %s = %q, want %q", k, got[k], v)
		}
	}
	if len(got) != len(want) {
		t.Errorf("container bare: env %v, want %v", got, want)
	}
	if h := env(pod.Spec.InitContainers[0])["KUBERNETES_SERVICE_HOST"]; h != "10.96.0.1" {
		t.Errorf("init container: KUBERNETES_SERVICE_HOST = %q", h)
	}
	if h := env(pod.Spec.Containers[1])["KUBERNETES_SERVICE_HOST"]; h != "10.0.0.9" {
		t.Errorf("a resolved variable was overwritten: %q", h)
	}
}

// When the Service cannot be read the pod is left as it was (and still starts).
func TestUnreadableMasterServiceLeavesThePodAlone(t *testing.T) {
	p := &Provider{client: fake.NewSimpleClientset(), log: log.New(os.Stderr, "", 0)}
	pod := &corev1.Pod{Spec: corev1.PodSpec{Containers: []corev1.Container{{Name: "c"}}}}
	p.ensureMasterServiceEnv(pod)
	if len(pod.Spec.Containers[0].Env) != 0 {
		t.Errorf("env = %v, want none", pod.Spec.Containers[0].Env)
	}
}
