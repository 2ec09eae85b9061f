package gateway

import (
	"fmt"
	"net"
	"strconv"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
)

// ResolvedRefs reasons (Gateway API RouteConditionReason) for a backendRef.
const (
	ReasonBackendNotFound = "BackendNotFound"
	ReasonRefNotPermitted = "RefNotPermitted"
	ReasonInvalidKind     = "InvalidKind"
)

// Services looks a Service up (a lister's Get: a NotFound error when there is none).
type Services func(namespace, name string) (*corev1.Service, error)

// Intn returns a random int in [0, n); injectable so that tests are deterministic.
type Intn func(n int) int

// RefError is a backendRef this data plane cannot send traffic to. Reason is the
// ResolvedRefs condition's reason; Message names the reference.
type RefError struct {
	Reason, Message string
}

func (e *RefError) Error() string { return e.Message }

// Pick chooses one of refs at random in proportion to the weights (absent: 1). A weight
// of 0 is never chosen; false when no ref has a weight above 0.
func Pick(refs []BackendRef, intn Intn) (int, bool) {
	total := 0
	for _, ref := range refs {
		total += int(max(deref(ref.Weight, 1), 0))
	}
	if total == 0 {
		return 0, false
	}
	n := intn(total)
	for i, ref := range refs {
		n -= int(max(deref(ref.Weight, 1), 0))
		if n < 0 {
			return i, true
		}
	}
	return 0, false // not reached
}

// Resolve turns a backendRef of a route in namespace into the address to proxy to: the
// Service's ClusterIP and the referenced Service port (kube-proxy balances over the
// endpoints from there). Only Services of the route's own namespace are allowed: there is
// no ReferenceGrant support.
func Resolve(namespace string, ref BackendRef, services Services) (string, *RefError) {
	group, kind := deref(ref.Group, ""), deref(ref.Kind, "Service")
	if group != "" || kind != "Service" {
		return "", &RefError{ReasonInvalidKind, fmt.Sprintf(
			"backendRef %s: kind %s of group %q is not supported (only core Services)", ref.Name, kind, group)}
	}
	ns := deref(ref.Namespace, namespace)
	if ns != namespace {
		return "", &RefError{ReasonRefNotPermitted, fmt.Sprintf(
			"backendRef Service %s/%s is in another namespace than the route (%s): "+
				"ReferenceGrant is not supported by recjob-gateway", ns, ref.Name, namespace)}
	}
	if ref.Port == nil {
		return "", &RefError{ReasonBackendNotFound, fmt.Sprintf("backendRef Service %s/%s has no port", ns, ref.Name)}
	}
	svc, err := services(ns, ref.Name)
	if apierrors.IsNotFound(err) || (err == nil && svc == nil) {
		return "", &RefError{ReasonBackendNotFound, fmt.Sprintf("Service %s/%s not found", ns, ref.Name)}
	}
	if err != nil {
		return "", &RefError{ReasonBackendNotFound, fmt.Sprintf("Service %s/%s: %v", ns, ref.Name, err)}
	}
	ip := svc.Spec.ClusterIP
	if ip == "" || ip == corev1.ClusterIPNone {
		return "", &RefError{ReasonBackendNotFound, fmt.Sprintf(
			"Service %s/%s has no ClusterIP (headless and ExternalName Services are not supported)", ns, ref.Name)}
	}
	for _, p := range svc.Spec.Ports {
		if p.Port == *ref.Port {
			return net.JoinHostPort(ip, strconv.Itoa(int(p.Port))), nil
		}
	}
	return "", &RefError{ReasonBackendNotFound, fmt.Sprintf("Service %s/%s has no port %d", ns, ref.Name, *ref.Port)}
}
