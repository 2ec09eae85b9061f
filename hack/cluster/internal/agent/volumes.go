package agent

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// volumeSource is where a pod volume lives on the host and whether it is refreshed.
type volumeSource struct {
	path    string
	dynamic bool // configMap, secret, projected: rewritten while the pod runs
}

// atomicWrite lays out files the way a kubelet does for ConfigMap/Secret volumes: the
// data in a timestamped folder, "..data" a symlink to it swapped atomically, and each
// key a symlink through "..data", so a running container sees old or new, never half.
func atomicWrite(dir string, files map[string][]byte, mode os.FileMode, gid int) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	stamp := fmt.Sprintf("..%d", time.Now().UnixNano())
	data := filepath.Join(dir, stamp)
	for name, content := range files {
		target := filepath.Join(data, name)
		if err := os.MkdirAll(filepath.Dir(target), 0o755); err != nil {
			return err
		}
		if err := os.WriteFile(target, content, mode); err != nil {
			return err
		}
		if gid >= 0 {
			_ = os.Chown(target, 0, gid)
		}
	}
	if err := os.MkdirAll(data, 0o755); err != nil {
		return err
	}
	tmp := filepath.Join(dir, "..data_tmp")
	_ = os.Remove(tmp)
	if err := os.Symlink(stamp, tmp); err != nil {
		return err
	}
	old, _ := os.Readlink(filepath.Join(dir, "..data"))
	if err := os.Rename(tmp, filepath.Join(dir, "..data")); err != nil {
		return err
	}
	for name := range files {
		top := name
		for filepath.Dir(top) != "." {
			top = filepath.Dir(top)
		}
		link := filepath.Join(dir, top)
		if _, err := os.Lstat(link); err != nil {
			if err := os.Symlink(filepath.Join("..data", top), link); err != nil {
				return err
			}
		}
	}
	if old != "" && old != stamp {
		_ = os.RemoveAll(filepath.Join(dir, old))
	}
	return nil
}

func keyFiles(data map[string][]byte, items []corev1.KeyToPath, what string) (map[string][]byte, error) {
	files := map[string][]byte{}
	if len(items) == 0 {
		for k, v := range data {
			files[k] = v
		}
		return files, nil
	}
	for _, item := range items {
		value, ok := data[item.Key]
		if !ok {
			return nil, fmt.Errorf("%s has no key %q", what, item.Key)
		}
		files[item.Path] = value
	}
	return files, nil
}

func (p *Provider) configMapFiles(ns string, src *corev1.ConfigMapVolumeSource) (map[string][]byte, error) {
	cm, err := p.configMaps.ConfigMaps(ns).Get(src.Name)
	if err != nil {
		if apierrors.IsNotFound(err) && src.Optional != nil && *src.Optional {
			return map[string][]byte{}, nil
		}
		return nil, fmt.Errorf("configmap %q: %w", src.Name, err)
	}
	data := map[string][]byte{}
	for k, v := range cm.Data {
		data[k] = []byte(v)
	}
	for k, v := range cm.BinaryData {
		data[k] = v
	}
	return keyFiles(data, src.Items, "configmap "+src.Name)
}

func (p *Provider) secretFiles(ns string, src *corev1.SecretVolumeSource) (map[string][]byte, error) {
	secret, err := p.secrets.Secrets(ns).Get(src.SecretName)
	if err != nil {
		if apierrors.IsNotFound(err) && src.Optional != nil && *src.Optional {
			return map[string][]byte{}, nil
		}
		return nil, fmt.Errorf("secret %q: %w", src.SecretName, err)
	}
	return keyFiles(secret.Data, src.Items, "secret "+src.SecretName)
}

// projectedFiles resolves a projected volume; ServiceAccount tokens come from the
// TokenRequest API, bound to the pod (what the kubelet does for kube-api-access-*).
func (p *Provider) projectedFiles(ctx context.Context, pod *corev1.Pod, src *corev1.ProjectedVolumeSource) (map[string][]byte, error) {
	files := map[string][]byte{}
	for _, source := range src.Sources {
		var part map[string][]byte
		var err error
		switch {
		case source.ConfigMap != nil:
			part, err = p.configMapFiles(pod.Namespace, &corev1.ConfigMapVolumeSource{
				LocalObjectReference: source.ConfigMap.LocalObjectReference,
				Items:                source.ConfigMap.Items, Optional: source.ConfigMap.Optional})
		case source.Secret != nil:
			part, err = p.secretFiles(pod.Namespace, &corev1.SecretVolumeSource{
				SecretName: source.Secret.Name, Items: source.Secret.Items, Optional: source.Secret.Optional})
		case source.DownwardAPI != nil:
			part, err = downwardFiles(pod, source.DownwardAPI.Items)
		case source.ServiceAccountToken != nil:
			part, err = p.token(ctx, pod, source.ServiceAccountToken)
		}
		if err != nil {
			return nil, err
		}
		for k, v := range part {
			files[k] = v
		}
	}
	return files, nil
}

func (p *Provider) token(ctx context.Context, pod *corev1.Pod, src *corev1.ServiceAccountTokenProjection) (map[string][]byte, error) {
	expiration := int64(3607)
	if src.ExpirationSeconds != nil {
		expiration = *src.ExpirationSeconds
	}
	var audiences []string
	if src.Audience != "" {
		audiences = []string{src.Audience}
	}
	request := &authenticationv1.TokenRequest{Spec: authenticationv1.TokenRequestSpec{
		Audiences:         audiences,
		ExpirationSeconds: &expiration,
		BoundObjectRef:    &authenticationv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID},
	}}
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	response, err := p.client.CoreV1().ServiceAccounts(pod.Namespace).CreateToken(ctx, sa, request, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("token for serviceaccount %q: %w", sa, err)
	}
	return map[string][]byte{src.Path: []byte(response.Status.Token)}, nil
}

func downwardFiles(pod *corev1.Pod, items []corev1.DownwardAPIVolumeFile) (map[string][]byte, error) {
	files := map[string][]byte{}
	for _, item := range items {
		if item.FieldRef == nil {
			continue // resourceFieldRef: not provided by this agent
		}
		value, err := fieldValue(pod, item.FieldRef.FieldPath)
		if err != nil {
			return nil, err
		}
		files[item.Path] = []byte(value)
	}
	return files, nil
}

// fieldValue is the downward API for the fields this agent knows.
func fieldValue(pod *corev1.Pod, path string) (string, error) {
	switch path {
	case "metadata.name":
		return pod.Name, nil
	case "metadata.namespace":
		return pod.Namespace, nil
	case "metadata.uid":
		return string(pod.UID), nil
	case "spec.nodeName":
		return pod.Spec.NodeName, nil
	case "spec.serviceAccountName":
		return pod.Spec.ServiceAccountName, nil
	case "status.podIP":
		return pod.Status.PodIP, nil
	case "status.hostIP":
		return pod.Status.HostIP, nil
	case "metadata.labels", "metadata.annotations":
		values := pod.Labels
		if path == "metadata.annotations" {
			values = pod.Annotations
		}
		out := ""
		for k, v := range values {
			out += k + "=" + strconv.Quote(v) + "\n"
		}
		return out, nil
	}
	return "", fmt.Errorf("unsupported fieldPath %q", path)
}

// persistentVolumePath follows a claim to its bound PersistentVolume's host path (the
// cluster's PVs are hostPath/local volumes under the cluster's state folder).
func (p *Provider) persistentVolumePath(ctx context.Context, ns, claim string) (string, error) {
	pvc, err := p.client.CoreV1().PersistentVolumeClaims(ns).Get(ctx, claim, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("persistentvolumeclaim %q: %w", claim, err)
	}
	if pvc.Spec.VolumeName == "" || pvc.Status.Phase != corev1.ClaimBound {
		return "", fmt.Errorf("persistentvolumeclaim %q is not bound", claim)
	}
	pv, err := p.client.CoreV1().PersistentVolumes().Get(ctx, pvc.Spec.VolumeName, metav1.GetOptions{})
	if err != nil {
		return "", fmt.Errorf("persistentvolume %q: %w", pvc.Spec.VolumeName, err)
	}
	switch {
	case pv.Spec.HostPath != nil:
		return pv.Spec.HostPath.Path, nil
	case pv.Spec.Local != nil:
		return pv.Spec.Local.Path, nil
	}
	return "", fmt.Errorf("persistentvolume %q is neither hostPath nor local", pv.Name)
}

// prepareVolumes materialises every volume of the pod under dir/volumes.
func (p *Provider) prepareVolumes(ctx context.Context, pod *corev1.Pod, dir string) (map[string]volumeSource, error) {
	sources := map[string]volumeSource{}
	gid := -1
	if sc := pod.Spec.SecurityContext; sc != nil && sc.FSGroup != nil {
		gid = int(*sc.FSGroup)
	}
	for _, volume := range pod.Spec.Volumes {
		path := filepath.Join(dir, "volumes", volume.Name)
		switch {
		case volume.EmptyDir != nil:
			if err := os.MkdirAll(path, 0o777); err != nil {
				return nil, err
			}
			_ = os.Chmod(path, 0o777)
			sources[volume.Name] = volumeSource{path: path}
		case volume.HostPath != nil:
			sources[volume.Name] = volumeSource{path: volume.HostPath.Path}
		case volume.PersistentVolumeClaim != nil:
			host, err := p.persistentVolumePath(ctx, pod.Namespace, volume.PersistentVolumeClaim.ClaimName)
			if err != nil {
				return nil, err
			}
			sources[volume.Name] = volumeSource{path: host}
		case volume.ConfigMap != nil, volume.Secret != nil, volume.Projected != nil, volume.DownwardAPI != nil:
			if err := p.refreshVolume(ctx, pod, volume, path, gid); err != nil {
				return nil, err
			}
			sources[volume.Name] = volumeSource{path: path, dynamic: true}
		default:
			return nil, fmt.Errorf("volume %q: this node supports emptyDir, hostPath, persistentVolumeClaim, configMap, secret, projected and downwardAPI", volume.Name)
		}
	}
	return sources, nil
}

// refreshVolume (re)writes a ConfigMap, Secret, projected or downward API volume.
func (p *Provider) refreshVolume(ctx context.Context, pod *corev1.Pod, volume corev1.Volume, path string, gid int) error {
	var files map[string][]byte
	var err error
	mode := os.FileMode(0o644)
	switch {
	case volume.ConfigMap != nil:
		files, err = p.configMapFiles(pod.Namespace, volume.ConfigMap)
		if volume.ConfigMap.DefaultMode != nil {
			mode = os.FileMode(*volume.ConfigMap.DefaultMode)
		}
	case volume.Secret != nil:
		files, err = p.secretFiles(pod.Namespace, volume.Secret)
		if volume.Secret.DefaultMode != nil {
			mode = os.FileMode(*volume.Secret.DefaultMode)
		}
	case volume.Projected != nil:
		files, err = p.projectedFiles(ctx, pod, volume.Projected)
		if volume.Projected.DefaultMode != nil {
			mode = os.FileMode(*volume.Projected.DefaultMode)
		}
	case volume.DownwardAPI != nil:
		files, err = downwardFiles(pod, volume.DownwardAPI.Items)
	}
	if err != nil {
		return fmt.Errorf("volume %q: %w", volume.Name, err)
	}
	if gid >= 0 && mode&0o040 == 0 {
		mode |= 0o040 // fsGroup can read
	}
	return atomicWrite(path, files, mode, gid)
}
