package netpol

import (
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
)

func pod(ns, name, ip string, labels map[string]string, ports ...corev1.ContainerPort) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: labels, UID: types.UID(ns + name)},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "c", Ports: ports}}},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip},
	}
}

func namespace(name string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name,
		Labels: map[string]string{"kubernetes.io/metadata.name": name}}}
}

func TestIngressAllowsOnlyTheSelectedPeersOnTheNamedPort(t *testing.T) {
	http := intstr.FromString("http")
	state := State{
		Pods: []*corev1.Pod{
			pod("a", "web", "10.244.1.2", map[string]string{"app": "web"},
				corev1.ContainerPort{Name: "http", ContainerPort: 8080}),
			pod("a", "client", "10.244.1.3", map[string]string{"role": "client"}),
			pod("a", "stranger", "10.244.1.4", nil),
			pod("b", "client", "10.244.2.3", map[string]string{"role": "client"}),
			pod("b", "other", "10.244.2.4", map[string]string{"role": "other"}),
		},
		Namespaces: []*corev1.Namespace{namespace("a"), namespace("b")},
		Policies: []*networkingv1.NetworkPolicy{{
			ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "web"},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{MatchLabels: map[string]string{"app": "web"}},
				Ingress: []networkingv1.NetworkPolicyIngressRule{{
					From: []networkingv1.NetworkPolicyPeer{
						{PodSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"role": "client"}}},
						{
							NamespaceSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"kubernetes.io/metadata.name": "b"}},
							PodSelector:       &metav1.LabelSelector{MatchLabels: map[string]string{"role": "client"}},
						},
						{IPBlock: &networkingv1.IPBlock{CIDR: "10.0.0.0/8", Except: []string{"10.244.0.0/16"}}},
					},
					Ports: []networkingv1.NetworkPolicyPort{{Port: &http}},
				}},
			},
		}},
	}
	rules := Rules(state)
	text := strings.Join(rules.Rules, "\n")
	for _, want := range []string{
		"-A RECJOB-NETPOL -d 10.244.1.2/32 -j RJNP-I-",
		"-s 10.244.1.3/32 -p tcp --dport 8080",
		"-s 10.244.2.3/32 -p tcp --dport 8080",
		"-s 10.0.0.0/8 -j RJNP-B-",
		"-s 10.244.0.0/16 -j RETURN",
	} {
		if !strings.Contains(text, want) {
			t.Errorf("missing %q in\n%s", want, text)
		}
	}
	for _, unwanted := range []string{"10.244.1.4", "10.244.2.4", "-s 10.244.1.2/32 -j"} {
		if strings.Contains(text, unwanted) {
			t.Errorf("unexpected %q in\n%s", unwanted, text)
		}
	}
	// no policy selects the clients: they are not isolated
	if strings.Contains(text, "-d 10.244.1.3/32") {
		t.Errorf("a pod no policy selects was isolated:\n%s", text)
	}
	restore := Restore(rules, []string{"RJNP-I-STALE", "KUBE-FORWARD"})
	if !strings.Contains(restore, "-X RJNP-I-STALE\n") || strings.Contains(restore, "KUBE-FORWARD") {
		t.Errorf("stale chains of ours only are deleted:\n%s", restore)
	}
}

func TestEgressPolicyWithoutRulesIsolatesThePod(t *testing.T) {
	state := State{
		Pods:       []*corev1.Pod{pod("a", "locked", "10.244.1.5", map[string]string{"role": "locked"})},
		Namespaces: []*corev1.Namespace{namespace("a")},
		Policies: []*networkingv1.NetworkPolicy{{
			ObjectMeta: metav1.ObjectMeta{Namespace: "a", Name: "deny"},
			Spec: networkingv1.NetworkPolicySpec{
				PodSelector: metav1.LabelSelector{},
				PolicyTypes: []networkingv1.PolicyType{networkingv1.PolicyTypeEgress},
			},
		}},
	}
	text := strings.Join(Rules(state).Rules, "\n")
	if !strings.Contains(text, "-s 10.244.1.5/32 -m mark ! --mark 0x10000/0x10000") {
		t.Errorf("egress not isolated:\n%s", text)
	}
	if strings.Contains(text, "-d 10.244.1.5/32") {
		t.Errorf("an Egress-only policy isolated ingress:\n%s", text)
	}
}
