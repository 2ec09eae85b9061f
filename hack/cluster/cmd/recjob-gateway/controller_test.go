package main

import (
	"context"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	kubefake "k8s.io/client-go/kubernetes/fake"

	"recjob.dev/hack/cluster/internal/gateway"
)

const testController = "recjob.dev/test-gateway"

func object(t *testing.T, text string) *unstructured.Unstructured {
	t.Helper()
	u := &unstructured.Unstructured{}
	if err := u.UnmarshalJSON([]byte(text)); err != nil {
		t.Fatal(err)
	}
	return u
}

// eventually polls probe for up to 10 s.
func eventually(t *testing.T, what string, probe func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
		if probe() {
			return
		}
	}
	t.Fatalf("timed out waiting for %s", what)
}

// TestControllerWiring runs the informers, the status worker and the proxy against fake
// clients: statuses get written (and not rewritten), Service changes update ResolvedRefs,
// and traffic reaches the backend.
func TestControllerWiring(t *testing.T) {
	backend := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		_, _ = io.WriteString(w, "stable")
	}))
	defer backend.Close()
	_, portText, _ := net.SplitHostPort(backend.Listener.Addr().String())
	port, _ := strconv.Atoi(portText)

	class := object(t, `{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass",
		"metadata": {"name": "recjob-test", "generation": 1}, "spec": {"controllerName": "`+testController+`"}}`)
	gw := object(t, `{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
		"metadata": {"namespace": "recjob-gateway", "name": "recjob", "generation": 1},
		"spec": {"gatewayClassName": "recjob-test", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP",
		"allowedRoutes": {"namespaces": {"from": "All"}}}]}}`)
	route := object(t, `{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
		"metadata": {"namespace": "ml", "name": "m", "generation": 2},
		"spec": {"parentRefs": [{"namespace": "recjob-gateway", "name": "recjob"}],
		"rules": [{"backendRefs": [{"name": "stable", "port": `+portText+`, "weight": 100},
		{"name": "canary", "port": 80, "weight": 0}]}]}}`)
	client := dynamicfake.NewSimpleDynamicClientWithCustomListKinds(runtime.NewScheme(), map[schema.GroupVersionResource]string{
		httpRoutes: "HTTPRouteList", gateways: "GatewayList", gatewayClasses: "GatewayClassList"}, class, route)
	// added by resource: the tracker would guess "gatewaies" for the kind Gateway
	if err := client.Tracker().Create(gateways, gw, "recjob-gateway"); err != nil {
		t.Fatal(err)
	}
	stable := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "ml", Name: "stable"},
		Spec: corev1.ServiceSpec{ClusterIP: "127.0.0.1", Ports: []corev1.ServicePort{{Port: int32(port)}}}}
	kube := kubefake.NewClientset(stable)

	ctx, cancel := context.WithCancel(context.Background())
	c, stop := start(ctx, client, kube, "recjob-gateway", "recjob", testController, "10.244.0.1")
	defer func() { cancel(); stop() }()
	if c == nil {
		t.Fatal("caches did not sync")
	}

	resolved := func() string {
		u, err := client.Resource(httpRoutes).Namespace("ml").Get(ctx, "m", metav1.GetOptions{})
		if err != nil {
			return ""
		}
		parents, _, _ := unstructured.NestedSlice(u.Object, "status", "parents")
		for _, p := range parents {
			for _, cond := range p.(map[string]any)["conditions"].([]any) {
				if cond := cond.(map[string]any); cond["type"] == "ResolvedRefs" {
					return cond["status"].(string) + " " + cond["reason"].(string)
				}
			}
		}
		return ""
	}
	eventually(t, "ResolvedRefs False (no canary Service)", func() bool { return resolved() == "False BackendNotFound" })
	eventually(t, "Gateway Programmed with one attached route", func() bool {
		u, _ := client.Resource(gateways).Namespace("recjob-gateway").Get(ctx, "recjob", metav1.GetOptions{})
		listeners, _, _ := unstructured.NestedSlice(u.Object, "status", "listeners")
		return len(listeners) == 1 && listeners[0].(map[string]any)["attachedRoutes"] == float64(1)
	})
	eventually(t, "GatewayClass Accepted", func() bool {
		u, _ := client.Resource(gatewayClasses).Get(ctx, "recjob-test", metav1.GetOptions{})
		conditions, _, _ := unstructured.NestedSlice(u.Object, "status", "conditions")
		return len(conditions) == 1
	})

	canary := stable.DeepCopy()
	canary.Name, canary.Spec.Ports = "canary", []corev1.ServicePort{{Port: 80}}
	if _, err := kube.CoreV1().Services("ml").Create(ctx, canary, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	eventually(t, "ResolvedRefs True", func() bool { return resolved() == "True ResolvedRefs" })

	writes := func() int {
		n := 0
		for _, a := range client.Actions() {
			if a.GetVerb() == "update" && a.GetSubresource() == "status" {
				n++
			}
		}
		return n
	}
	before := writes()
	time.Sleep(500 * time.Millisecond)
	if after := writes(); after != before {
		t.Fatalf("status written %d more times with nothing changed", after-before)
	}

	proxy := httptest.NewServer(gateway.NewProxy(c.table, c.service, rand.IntN, t.Logf, nil))
	defer proxy.Close()
	resp, err := http.Get(proxy.URL + "/v1/models/m:predict")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != 200 || string(body) != "stable" {
		t.Fatalf("got %d %q", resp.StatusCode, body)
	}
}
