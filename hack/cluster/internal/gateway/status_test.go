package gateway

import (
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

const controller = "recjob.dev/test-gateway"

func object(t *testing.T, text string) *unstructured.Unstructured {
	t.Helper()
	u := &unstructured.Unstructured{}
	if err := u.UnmarshalJSON([]byte(text)); err != nil { // integers as int64, as from the API
		t.Fatal(err)
	}
	return u
}

func testGateway(t *testing.T, from string) *Gateway {
	g, err := ParseGateway(object(t, `{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
		"metadata": {"namespace": "recjob-gateway", "name": "recjob", "generation": 1},
		"spec": {"gatewayClassName": "recjob-test", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP",
		"allowedRoutes": {"namespaces": {"from": "`+from+`"}}}]}}`))
	if err != nil {
		t.Fatal(err)
	}
	return g
}

const canaryRoute = `{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute", "metadata": {"namespace": "ml", "name": "m", "generation": 3},
	"spec": {"parentRefs": [
		{"group": "gateway.networking.k8s.io", "kind": "Gateway", "namespace": "recjob-gateway", "name": "recjob"},
		{"name": "istio"}],
	  "rules": [{"backendRefs": [{"name": "m-predictor", "port": 80, "weight": 90}, {"name": "m-canary-predictor", "port": 80, "weight": 10}]}]},
	"status": {"parents": [{"parentRef": {"name": "istio"}, "controllerName": "istio.io/gateway-controller",
		"conditions": [{"type": "Accepted", "status": "True", "reason": "Accepted", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}]}}`

// parents applies RouteStatus to u (as a status write would) and returns the entries.
func parents(t *testing.T, u *unstructured.Unstructured, g *Gateway, s Services, now time.Time) ([]RouteParentStatus, bool) {
	t.Helper()
	out, changed, err := RouteStatus(u, g, controller, s, now)
	if err != nil {
		t.Fatal(err)
	}
	if changed {
		u.Object["status"] = map[string]any{"parents": out}
	}
	var entries []RouteParentStatus
	if err := decode(u.Object["status"].(map[string]any)["parents"], &entries); err != nil {
		t.Fatal(err)
	}
	return entries, changed
}

func cond(entry RouteParentStatus, kind string) metav1.Condition {
	for _, c := range entry.Conditions {
		if c.Type == kind {
			return c
		}
	}
	return metav1.Condition{}
}

func TestRouteStatusLifecycle(t *testing.T) {
	g, u := testGateway(t, "All"), object(t, canaryRoute)
	t0 := time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC)
	stableOnly := services(service("m-predictor", "10.96.0.20", 80))

	entries, changed := parents(t, u, g, stableOnly, t0)
	if !changed || len(entries) != 2 || entries[0].ControllerName != "istio.io/gateway-controller" {
		t.Fatalf("other controller's entry not kept first: %+v", entries)
	}
	ours := entries[1]
	accepted, resolved := cond(ours, "Accepted"), cond(ours, "ResolvedRefs")
	if ours.ControllerName != controller || ours.ParentRef.Name != "recjob" || *ours.ParentRef.Namespace != "recjob-gateway" {
		t.Fatalf("entry %+v", ours)
	}
	if accepted.Status != metav1.ConditionTrue || accepted.ObservedGeneration != 3 {
		t.Fatalf("Accepted %+v", accepted)
	}
	if resolved.Status != metav1.ConditionFalse || resolved.Reason != ReasonBackendNotFound ||
		!strings.Contains(resolved.Message, "Service ml/m-canary-predictor not found") {
		t.Fatalf("ResolvedRefs %+v", resolved)
	}

	if _, changed := parents(t, u, g, stableOnly, t0.Add(time.Minute)); changed {
		t.Fatal("status rewritten although nothing changed")
	}

	both := services(service("m-predictor", "10.96.0.20", 80), service("m-canary-predictor", "10.96.0.21", 80))
	entries, changed = parents(t, u, g, both, t0.Add(2*time.Minute))
	if !changed || cond(entries[1], "ResolvedRefs").Status != metav1.ConditionTrue {
		t.Fatalf("ResolvedRefs not updated: %+v", entries[1])
	}
	if !cond(entries[1], "Accepted").LastTransitionTime.Time.Equal(t0) {
		t.Fatalf("Accepted lastTransitionTime moved: %+v", cond(entries[1], "Accepted"))
	}

	spec := u.Object["spec"].(map[string]any)
	spec["parentRefs"] = spec["parentRefs"].([]any)[1:] // detached from our Gateway
	entries, changed = parents(t, u, g, both, t0.Add(3*time.Minute))
	if !changed || len(entries) != 1 || entries[0].ControllerName == controller {
		t.Fatalf("our entry not removed: %+v", entries)
	}
}

func TestRouteStatusNotAccepted(t *testing.T) {
	for _, tc := range []struct {
		name, from, route, reason string
	}{
		{"listener allows its namespace only", "Same", canaryRoute, ReasonNotAllowedByListeners},
		{"selector unsupported", "Selector", canaryRoute, ReasonNotAllowedByListeners},
		{"filters unsupported", "All", strings.Replace(canaryRoute, `"rules": [{`,
			`"rules": [{"filters": [{"type": "RequestHeaderModifier"}], `, 1), ReasonUnsupportedValue},
		{"regex unsupported", "All", strings.Replace(canaryRoute, `"rules": [{`,
			`"rules": [{"matches": [{"path": {"type": "RegularExpression", "value": "/.*"}}], `, 1), ReasonUnsupportedValue},
		{"no such listener", "All", strings.Replace(canaryRoute, `"name": "recjob"}`,
			`"name": "recjob", "sectionName": "https"}`, 1), ReasonNoMatchingParent},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g, u := testGateway(t, tc.from), object(t, tc.route)
			entries, _ := parents(t, u, g, services(), time.Now())
			if c := cond(entries[1], "Accepted"); c.Status != metav1.ConditionFalse || c.Reason != tc.reason || c.Message == "" {
				t.Fatalf("Accepted %+v, want False %s", c, tc.reason)
			}
			route, _ := ParseRoute(u)
			if table, counts := g.Attached([]*Route{route}); len(table.Routes) != 0 || counts["http"] != 0 {
				t.Fatalf("a route not accepted is served: %v", counts)
			}
		})
	}
}

func TestTargetsAndAttached(t *testing.T) {
	g := testGateway(t, "All")
	same := &Route{Namespace: "recjob-gateway", Name: "local", Spec: RouteSpec{ParentRefs: []ParentRef{{Name: "recjob"}}}}
	empty := &Route{Namespace: "ml", Name: "empty-group", Spec: RouteSpec{ParentRefs: []ParentRef{
		{Group: ptr(""), Kind: ptr("Gateway"), Namespace: ptr("recjob-gateway"), Name: "recjob"}}}}
	others := []*Route{
		{Namespace: "ml", Name: "own-namespace", Spec: RouteSpec{ParentRefs: []ParentRef{{Name: "recjob"}}}},
		{Namespace: "ml", Name: "other-kind", Spec: RouteSpec{ParentRefs: []ParentRef{{Kind: ptr("Service"), Namespace: ptr("recjob-gateway"), Name: "recjob"}}}},
		{Namespace: "ml", Name: "other-name", Spec: RouteSpec{ParentRefs: []ParentRef{{Namespace: ptr("recjob-gateway"), Name: "other"}}}},
	}
	table, counts := g.Attached(append([]*Route{same, empty}, others...))
	if len(table.Routes) != 2 || table.Routes[0] != same || table.Routes[1] != empty || counts["http"] != 2 {
		t.Fatalf("attached %v %v", table.Routes, counts)
	}
}

func TestGatewayAndClassStatus(t *testing.T) {
	gw := object(t, `{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway", "metadata": {"namespace": "recjob-gateway", "name": "recjob", "generation": 2},
		"spec": {"gatewayClassName": "recjob-test", "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"},
		{"name": "https", "port": 443, "protocol": "HTTPS"}]},
		"status": {"conditions": [{"type": "Accepted", "status": "Unknown", "reason": "Pending", "message": "Waiting for controller", "lastTransitionTime": "1970-01-01T00:00:00Z"}]}}`)
	now := time.Date(2026, 2, 1, 0, 0, 0, 0, time.UTC)
	status, changed, err := GatewayStatusFor(gw, "10.244.0.1", map[string]int32{"http": 3}, now)
	if err != nil || !changed {
		t.Fatal(changed, err)
	}
	gw.Object["status"] = status
	var got GatewayStatus
	_ = decode(status, &got)
	if got.Addresses[0].Value != "10.244.0.1" || len(got.Conditions) != 2 || got.Conditions[1].Type != "Programmed" ||
		got.Listeners[0].AttachedRoutes != 3 || got.Listeners[1].Conditions[0].Reason != "UnsupportedProtocol" {
		t.Fatalf("status %+v", got)
	}
	if _, changed, _ := GatewayStatusFor(gw, "10.244.0.1", map[string]int32{"http": 3}, now.Add(time.Hour)); changed {
		t.Fatal("Gateway status rewritten although nothing changed")
	}
	if _, changed, _ := GatewayStatusFor(gw, "10.244.0.1", map[string]int32{"http": 4}, now.Add(time.Hour)); !changed {
		t.Fatal("attachedRoutes change not written")
	}

	class := object(t, `{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "GatewayClass", "metadata": {"name": "recjob-test", "generation": 1}, "spec": {"controllerName": "`+controller+`"}}`)
	conditions, changed, err := GatewayClassConditions(class, now)
	if err != nil || !changed {
		t.Fatal(changed, err)
	}
	class.Object["status"] = map[string]any{"conditions": conditions}
	if _, changed, _ := GatewayClassConditions(class, now.Add(time.Hour)); changed {
		t.Fatal("GatewayClass status rewritten although nothing changed")
	}
}
