package agent

import (
	"context"
	"fmt"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// masterServiceEnv is the environment a kubelet gives every container for the API
// server's Service (default/kubernetes), whatever enableServiceLinks says: the
// KUBERNETES_SERVICE_* and Docker-links KUBERNETES_PORT* variables that in-cluster
// clients (client-go's rest.InClusterConfig, the kubernetes Python client, kopf) read.
func masterServiceEnv(svc *corev1.Service) []corev1.EnvVar {
	if svc.Spec.ClusterIP == "" || svc.Spec.ClusterIP == corev1.ClusterIPNone || len(svc.Spec.Ports) == 0 {
		return nil
	}
	ip := svc.Spec.ClusterIP
	first := svc.Spec.Ports[0]
	env := []corev1.EnvVar{
		{Name: "KUBERNETES_SERVICE_HOST", Value: ip},
		{Name: "KUBERNETES_SERVICE_PORT", Value: fmt.Sprint(first.Port)},
		{Name: "KUBERNETES_PORT", Value: fmt.Sprintf("%s://%s:%d", strings.ToLower(string(first.Protocol)), ip, first.Port)},
	}
	for _, port := range svc.Spec.Ports {
		if port.Name != "" {
			name := strings.ToUpper(strings.ReplaceAll(port.Name, "-", "_"))
			env = append(env, corev1.EnvVar{Name: "KUBERNETES_SERVICE_PORT_" + name, Value: fmt.Sprint(port.Port)})
		}
		proto := strings.ToLower(string(port.Protocol))
		prefix := fmt.Sprintf("KUBERNETES_PORT_%d_%s", port.Port, strings.ToUpper(proto))
		env = append(env,
			corev1.EnvVar{Name: prefix, Value: fmt.Sprintf("%s://%s:%d", proto, ip, port.Port)},
			corev1.EnvVar{Name: prefix + "_PROTO", Value: proto},
			corev1.EnvVar{Name: prefix + "_PORT", Value: fmt.Sprint(port.Port)},
			corev1.EnvVar{Name: prefix + "_ADDR", Value: ip},
		)
	}
	return env
}

// ensureMasterServiceEnv adds the API server's Service variables to every container of
// pod that lacks them. virtual-kubelet v1.14 resolves a pod's service environment from its
// Service informer but starts pods as soon as its pod informer has synced, so a pod
// created right after the agent starts (a restart on kept state) could miss them, where a
// kubelet refuses to start pods until it has read the services once. Variables the pod
// already has are left alone; when the Service cannot be read the pod starts as before
// and the failure is logged.
func (p *Provider) ensureMasterServiceEnv(pod *corev1.Pod) {
	missing := false
	for _, containers := range [][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for _, c := range containers {
			if !hasEnv(c.Env, "KUBERNETES_SERVICE_HOST") {
				missing = true
			}
		}
	}
	if !missing {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	svc, err := p.client.CoreV1().Services(metav1.NamespaceDefault).Get(ctx, "kubernetes", metav1.GetOptions{})
	if err != nil {
		p.log.Printf("pod %s/%s: cannot read default/kubernetes for its environment: %v", pod.Namespace, pod.Name, err)
		return
	}
	env := masterServiceEnv(svc)
	for _, containers := range [][]corev1.Container{pod.Spec.InitContainers, pod.Spec.Containers} {
		for i := range containers {
			for _, e := range env {
				if !hasEnv(containers[i].Env, e.Name) {
					containers[i].Env = append(containers[i].Env, e)
				}
			}
		}
	}
}

func hasEnv(env []corev1.EnvVar, name string) bool {
	for _, e := range env {
		if e.Name == name {
			return true
		}
	}
	return false
}
