package gateway

import (
	"fmt"
	"strings"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
)

// Gateway is a Gateway (gateway.networking.k8s.io/v1), the fields read here.
type Gateway struct {
	Namespace, Name string
	Generation      int64
	Spec            struct {
		GatewayClassName string     `json:"gatewayClassName"`
		Listeners        []Listener `json:"listeners"`
	}
}

// Listener is a Gateway listener. recjob-gateway serves every HTTP listener on its one
// --listen address: port and hostname are not bound.
type Listener struct {
	Name          string `json:"name"`
	Port          int32  `json:"port"`
	Protocol      string `json:"protocol"`
	AllowedRoutes *struct {
		Namespaces *struct {
			From *string `json:"from,omitempty"`
		} `json:"namespaces,omitempty"`
		Kinds []struct {
			Group *string `json:"group,omitempty"`
			Kind  string  `json:"kind"`
		} `json:"kinds,omitempty"`
	} `json:"allowedRoutes,omitempty"`
}

// Route acceptance reasons (Accepted=False) of the Gateway API.
const (
	ReasonNotAllowedByListeners = "NotAllowedByListeners"
	ReasonNoMatchingParent      = "NoMatchingParent"
	ReasonUnsupportedValue      = "UnsupportedValue"
)

// ParseGateway reads a Gateway from its unstructured form.
func ParseGateway(u *unstructured.Unstructured) (*Gateway, error) {
	g := &Gateway{Namespace: u.GetNamespace(), Name: u.GetName(), Generation: u.GetGeneration()}
	if err := decode(u.Object["spec"], &g.Spec); err != nil {
		return nil, fmt.Errorf("Gateway %s/%s: %w", g.Namespace, g.Name, err)
	}
	return g, nil
}

// supported tells whether a listener is one this data plane serves (HTTP).
func (l Listener) supported() bool { return l.Protocol == "HTTP" }

// allows applies a listener's allowedRoutes to an HTTPRoute of namespace (from: Same by
// default; All; Selector is not supported and allows nothing); "" when allowed.
func (l Listener) allows(gatewayNamespace, namespace string) string {
	from := "Same"
	if l.AllowedRoutes != nil {
		if l.AllowedRoutes.Namespaces != nil {
			from = deref(l.AllowedRoutes.Namespaces.From, "Same")
		}
		if kinds := l.AllowedRoutes.Kinds; len(kinds) > 0 {
			found := false
			for _, k := range kinds {
				found = found || (k.Kind == "HTTPRoute" && deref(k.Group, Group) == Group)
			}
			if !found {
				return fmt.Sprintf("listener %s does not allow HTTPRoutes", l.Name)
			}
		}
	}
	switch {
	case from == "All", from == "Same" && namespace == gatewayNamespace:
		return ""
	case from == "Same":
		return fmt.Sprintf("listener %s allows routes of namespace %s only", l.Name, gatewayNamespace)
	}
	return fmt.Sprintf("listener %s: allowedRoutes from %s is not supported by recjob-gateway", l.Name, from)
}

// Admit decides whether the Gateway accepts route through ref (a parentRef that targets
// it): the names of the listeners that take it, or none with the Accepted=False reason
// and message. A route using features this data plane lacks is not accepted either.
func (g *Gateway) Admit(route *Route, ref ParentRef) (listeners []string, reason, message string) {
	if unsupported := route.Unsupported(); unsupported != "" {
		return nil, ReasonUnsupportedValue, unsupported
	}
	var refused []string
	candidates := 0
	for _, l := range g.Spec.Listeners {
		if (ref.SectionName != nil && *ref.SectionName != l.Name) || (ref.Port != nil && *ref.Port != l.Port) {
			continue
		}
		candidates++
		switch why := l.allows(g.Namespace, route.Namespace); {
		case !l.supported():
			refused = append(refused, fmt.Sprintf("listener %s: protocol %s is not served by recjob-gateway", l.Name, l.Protocol))
		case why != "":
			refused = append(refused, why)
		default:
			listeners = append(listeners, l.Name)
		}
	}
	switch {
	case len(listeners) > 0:
		return listeners, "", ""
	case candidates == 0:
		return nil, ReasonNoMatchingParent, fmt.Sprintf("Gateway %s/%s has no listener matching sectionName/port", g.Namespace, g.Name)
	}
	return nil, ReasonNotAllowedByListeners, strings.Join(refused, "; ")
}

// Attached returns the routes the Gateway accepts through at least one listener (the
// table to serve) and, per listener name, how many it accepted (status attachedRoutes).
func (g *Gateway) Attached(routes []*Route) (table *Table, perListener map[string]int32) {
	table, perListener = &Table{}, map[string]int32{}
	for _, route := range routes {
		seen, attached := map[string]bool{}, false
		for _, ref := range route.Spec.ParentRefs {
			if !ref.Targets(route.Namespace, g.Namespace, g.Name) {
				continue
			}
			names, _, _ := g.Admit(route, ref)
			for _, name := range names {
				if !seen[name] {
					seen[name], attached = true, true
					perListener[name]++
				}
			}
		}
		if attached {
			table.Routes = append(table.Routes, route)
		}
	}
	return table, perListener
}
