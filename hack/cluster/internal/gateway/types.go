// Package gateway is the logic of recjob-gateway, the test cluster's minimal Gateway API
// data plane: which HTTPRoutes attach to the Gateway, which rule of which route a request
// matches (with the Gateway API's precedence), which backend a rule sends it to (weighted),
// the proxying itself, and the status a Gateway API implementation writes.
//
// Objects are read as JSON into the small structs below (only the fields used), so the
// module needs no dependency on sigs.k8s.io/gateway-api.
package gateway

import (
	"encoding/json"
	"fmt"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// Group is the Gateway API group.
const Group = "gateway.networking.k8s.io"

// Route is an HTTPRoute (gateway.networking.k8s.io/v1), the fields this data plane reads.
type Route struct {
	Namespace, Name string
	Generation      int64
	Created         time.Time
	Spec            RouteSpec
}

// RouteSpec is HTTPRouteSpec.
type RouteSpec struct {
	ParentRefs []ParentRef `json:"parentRefs,omitempty"`
	Hostnames  []string    `json:"hostnames,omitempty"`
	Rules      []Rule      `json:"rules,omitempty"`
}

// ParentRef is a route's reference to a Gateway. Pointers keep "absent" apart from
// "empty", so that a ParentRef written back into status equals the one in spec.
type ParentRef struct {
	Group       *string `json:"group,omitempty"`
	Kind        *string `json:"kind,omitempty"`
	Namespace   *string `json:"namespace,omitempty"`
	Name        string  `json:"name"`
	SectionName *string `json:"sectionName,omitempty"`
	Port        *int32  `json:"port,omitempty"`
}

// Rule is HTTPRouteRule. Filters are kept raw: only their presence matters (unsupported).
type Rule struct {
	Matches     []Match           `json:"matches,omitempty"`
	Filters     []json.RawMessage `json:"filters,omitempty"`
	BackendRefs []BackendRef      `json:"backendRefs,omitempty"`
}

// Match is HTTPRouteMatch: every condition present must hold.
type Match struct {
	Path        *PathMatch   `json:"path,omitempty"`
	Headers     []ValueMatch `json:"headers,omitempty"`
	QueryParams []ValueMatch `json:"queryParams,omitempty"`
	Method      *string      `json:"method,omitempty"`
}

// PathMatch is HTTPPathMatch (type defaults to PathPrefix, value to "/").
type PathMatch struct {
	Type  *string `json:"type,omitempty"`
	Value *string `json:"value,omitempty"`
}

// ValueMatch is HTTPHeaderMatch or HTTPQueryParamMatch (type defaults to Exact).
type ValueMatch struct {
	Type  *string `json:"type,omitempty"`
	Name  string  `json:"name"`
	Value string  `json:"value"`
}

// BackendRef is HTTPBackendRef (group defaults to "", kind to Service, weight to 1).
type BackendRef struct {
	Group     *string           `json:"group,omitempty"`
	Kind      *string           `json:"kind,omitempty"`
	Name      string            `json:"name"`
	Namespace *string           `json:"namespace,omitempty"`
	Port      *int32            `json:"port,omitempty"`
	Weight    *int32            `json:"weight,omitempty"`
	Filters   []json.RawMessage `json:"filters,omitempty"`
}

// Key is "namespace/name".
func (r *Route) Key() string { return r.Namespace + "/" + r.Name }

// ParseRoute reads an HTTPRoute from its unstructured form.
func ParseRoute(u *unstructured.Unstructured) (*Route, error) {
	r := &Route{Namespace: u.GetNamespace(), Name: u.GetName(), Generation: u.GetGeneration(),
		Created: u.GetCreationTimestamp().Time}
	if err := decode(u.Object["spec"], &r.Spec); err != nil {
		return nil, fmt.Errorf("HTTPRoute %s: %w", r.Key(), err)
	}
	return r, nil
}

// decode converts an unstructured value into a typed one through JSON.
func decode(in any, out any) error {
	if in == nil {
		return nil
	}
	data, err := json.Marshal(in)
	if err != nil {
		return err
	}
	return json.Unmarshal(data, out)
}

// encode converts a typed value into its unstructured form through JSON.
func encode(in any) (any, error) {
	data, err := json.Marshal(in)
	if err != nil {
		return nil, err
	}
	var out any
	return out, json.Unmarshal(data, &out)
}

// Targets tells whether ref names the Gateway namespace/name; a reference without a
// namespace means the route's own.
func (ref ParentRef) Targets(routeNamespace, namespace, name string) bool {
	group, kind, ns := deref(ref.Group, Group), deref(ref.Kind, "Gateway"), deref(ref.Namespace, routeNamespace)
	return (group == Group || group == "") && kind == "Gateway" && ns == namespace && ref.Name == name
}

// Unsupported names the first feature of the route this data plane does not implement
// (filters, RegularExpression matches), or "" when it has none. Such a route is not
// accepted (Accepted=False, UnsupportedValue) rather than served differently.
func (r *Route) Unsupported() string {
	for i, rule := range r.Spec.Rules {
		if len(rule.Filters) > 0 {
			return fmt.Sprintf("rules[%d].filters: filters are not supported by recjob-gateway", i)
		}
		for j, ref := range rule.BackendRefs {
			if len(ref.Filters) > 0 {
				return fmt.Sprintf("rules[%d].backendRefs[%d].filters: filters are not supported by recjob-gateway", i, j)
			}
		}
		for j, m := range rule.Matches {
			if m.Path != nil && deref(m.Path.Type, PathPrefix) != PathPrefix && deref(m.Path.Type, PathPrefix) != Exact {
				return fmt.Sprintf("rules[%d].matches[%d].path.type %s is not supported by recjob-gateway", i, j, *m.Path.Type)
			}
			for _, v := range append(append([]ValueMatch{}, m.Headers...), m.QueryParams...) {
				if deref(v.Type, Exact) != Exact {
					return fmt.Sprintf("rules[%d].matches[%d]: match type %s (%s) is not supported by recjob-gateway", i, j, *v.Type, v.Name)
				}
			}
		}
	}
	return ""
}

// deref is *p, or def when p is nil.
func deref[T any](p *T, def T) T {
	if p == nil {
		return def
	}
	return *p
}

// condition is a metav1.Condition with the generation it describes.
func condition(kind string, ok bool, reason, message string, generation int64, now time.Time) metav1.Condition {
	status := metav1.ConditionTrue
	if !ok {
		status = metav1.ConditionFalse
	}
	return metav1.Condition{Type: kind, Status: status, Reason: reason, Message: message,
		ObservedGeneration: generation, LastTransitionTime: metav1.NewTime(now.Truncate(time.Second))}
}
