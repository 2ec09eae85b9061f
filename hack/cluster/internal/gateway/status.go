package gateway

import (
	"fmt"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// RouteParentStatus is one entry of an HTTPRoute's status.parents.
type RouteParentStatus struct {
	ParentRef      ParentRef          `json:"parentRef"`
	ControllerName string             `json:"controllerName"`
	Conditions     []metav1.Condition `json:"conditions"`
}

// GatewayStatus is a Gateway's status.
type GatewayStatus struct {
	Addresses  []GatewayAddress   `json:"addresses,omitempty"`
	Conditions []metav1.Condition `json:"conditions,omitempty"`
	Listeners  []ListenerStatus   `json:"listeners,omitempty"`
}

// GatewayAddress is an address the Gateway is reached on.
type GatewayAddress struct {
	Type  string `json:"type"`
	Value string `json:"value"`
}

// ListenerStatus is the status of one Gateway listener.
type ListenerStatus struct {
	Name           string             `json:"name"`
	SupportedKinds []RouteGroupKind   `json:"supportedKinds"`
	AttachedRoutes int32              `json:"attachedRoutes"`
	Conditions     []metav1.Condition `json:"conditions"`
}

// RouteGroupKind names a kind of route.
type RouteGroupKind struct {
	Group string `json:"group"`
	Kind  string `json:"kind"`
}

// RouteStatus computes an HTTPRoute's status.parents: the entries of other controllers
// and Gateways kept, one entry of this controller per parentRef that targets g, with
// Accepted and ResolvedRefs for the route's generation. changed is false when that equals
// the current status (nothing to write). Conditions keep their lastTransitionTime while
// their status stays.
func RouteStatus(u *unstructured.Unstructured, g *Gateway, controller string, services Services,
	now time.Time) (parents any, changed bool, err error) {
	route, err := ParseRoute(u)
	if err != nil {
		return nil, false, err
	}
	var current []RouteParentStatus
	status, _ := u.Object["status"].(map[string]any)
	if err := decode(status["parents"], &current); err != nil {
		return nil, false, fmt.Errorf("HTTPRoute %s status: %w", route.Key(), err)
	}
	ours := func(p RouteParentStatus) bool {
		return p.ControllerName == controller && p.ParentRef.Targets(route.Namespace, g.Namespace, g.Name)
	}
	next := []RouteParentStatus{}
	for _, p := range current {
		if !ours(p) {
			next = append(next, p)
		}
	}
	resolved := resolvedRefs(route, services, now)
	for _, ref := range route.Spec.ParentRefs {
		if !ref.Targets(route.Namespace, g.Namespace, g.Name) {
			continue
		}
		entry := RouteParentStatus{ParentRef: ref, ControllerName: controller}
		for _, p := range current {
			if ours(p) && equality.Semantic.DeepEqual(p.ParentRef, ref) {
				entry.Conditions = keep(p.Conditions, "Accepted", "ResolvedRefs")
			}
		}
		accepted := condition("Accepted", true, "Accepted",
			fmt.Sprintf("accepted by Gateway %s/%s", g.Namespace, g.Name), route.Generation, now)
		if listeners, reason, message := g.Admit(route, ref); len(listeners) == 0 {
			accepted = condition("Accepted", false, reason, message, route.Generation, now)
		}
		meta.SetStatusCondition(&entry.Conditions, accepted)
		meta.SetStatusCondition(&entry.Conditions, resolved)
		next = append(next, entry)
	}
	if len(current) == 0 && len(next) == 0 || equality.Semantic.DeepEqual(current, next) {
		return nil, false, nil
	}
	parents, err = encode(next)
	return parents, true, err
}

// resolvedRefs is the ResolvedRefs condition of a route: False with the reason of the
// first backendRef that does not resolve and the messages of all that do not.
func resolvedRefs(route *Route, services Services, now time.Time) metav1.Condition {
	var reason string
	var problems []string
	for i, rule := range route.Spec.Rules {
		for j, ref := range rule.BackendRefs {
			if _, refErr := Resolve(route.Namespace, ref, services); refErr != nil {
				if reason == "" {
					reason = refErr.Reason
				}
				problems = append(problems, fmt.Sprintf("rules[%d].backendRefs[%d]: %s", i, j, refErr.Message))
			}
		}
	}
	if reason != "" {
		return condition("ResolvedRefs", false, reason, strings.Join(problems, "; "), route.Generation, now)
	}
	return condition("ResolvedRefs", true, "ResolvedRefs", "all backendRefs resolved", route.Generation, now)
}

// GatewayStatusFor computes the status of the Gateway served on address (an IP) with
// attached routes per listener: Accepted and Programmed, and per listener Accepted,
// Programmed, ResolvedRefs, Conflicted. changed is false when equal to the current.
func GatewayStatusFor(u *unstructured.Unstructured, address string, attached map[string]int32,
	now time.Time) (status any, changed bool, err error) {
	g, err := ParseGateway(u)
	if err != nil {
		return nil, false, err
	}
	var current GatewayStatus
	if err := decode(u.Object["status"], &current); err != nil {
		return nil, false, fmt.Errorf("Gateway %s/%s status: %w", g.Namespace, g.Name, err)
	}
	gen := g.Generation
	next := GatewayStatus{
		Addresses:  []GatewayAddress{{Type: "IPAddress", Value: address}},
		Conditions: keep(current.Conditions, "Accepted", "Programmed"),
		Listeners:  []ListenerStatus{},
	}
	meta.SetStatusCondition(&next.Conditions, condition("Accepted", true, "Accepted", "recjob-gateway", gen, now))
	meta.SetStatusCondition(&next.Conditions, condition("Programmed", true, "Programmed",
		"served by recjob-gateway on "+address, gen, now))
	for _, l := range g.Spec.Listeners {
		ls := ListenerStatus{Name: l.Name, SupportedKinds: []RouteGroupKind{}, Conditions: []metav1.Condition{},
			AttachedRoutes: attached[l.Name]}
		for _, old := range current.Listeners {
			if old.Name == l.Name {
				ls.Conditions = keep(old.Conditions, "Accepted", "Programmed", "ResolvedRefs", "Conflicted")
			}
		}
		ok, reason, message := true, "Accepted", "HTTP listener served by recjob-gateway"
		if !l.supported() {
			ok, reason, message = false, "UnsupportedProtocol", "recjob-gateway serves HTTP only, not "+l.Protocol
		} else {
			ls.SupportedKinds = append(ls.SupportedKinds, RouteGroupKind{Group: Group, Kind: "HTTPRoute"})
		}
		programmed := map[bool]string{true: "Programmed", false: "Invalid"}[ok]
		for _, c := range []metav1.Condition{
			condition("Accepted", ok, reason, message, gen, now),
			condition("Programmed", ok, programmed, message, gen, now),
			condition("ResolvedRefs", true, "ResolvedRefs", "", gen, now),
			condition("Conflicted", false, "NoConflicts", "", gen, now),
		} {
			meta.SetStatusCondition(&ls.Conditions, c)
		}
		next.Listeners = append(next.Listeners, ls)
	}
	if equality.Semantic.DeepEqual(current, next) {
		return nil, false, nil
	}
	status, err = encode(next)
	return status, true, err
}

// GatewayClassConditions computes the status.conditions of a GatewayClass of this
// controller (Accepted=True); changed is false when equal to the current.
func GatewayClassConditions(u *unstructured.Unstructured, now time.Time) (conditions any, changed bool, err error) {
	var current []metav1.Condition
	status, _ := u.Object["status"].(map[string]any)
	if err := decode(status["conditions"], &current); err != nil {
		return nil, false, fmt.Errorf("GatewayClass %s status: %w", u.GetName(), err)
	}
	next := keep(current, "Accepted", "SupportedVersion")
	meta.SetStatusCondition(&next, condition("Accepted", true, "Accepted",
		"handled by recjob-gateway", u.GetGeneration(), now))
	if equality.Semantic.DeepEqual(current, next) {
		return nil, false, nil
	}
	conditions, err = encode(next)
	return conditions, true, err
}

// keep copies the conditions of the given types (so that SetStatusCondition keeps their
// lastTransitionTime), dropping any other.
func keep(conditions []metav1.Condition, types ...string) []metav1.Condition {
	out := []metav1.Condition{}
	for _, c := range conditions {
		for _, t := range types {
			if c.Type == t {
				out = append(out, c)
			}
		}
	}
	return out
}
