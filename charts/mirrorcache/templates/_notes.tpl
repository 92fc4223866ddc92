{{/* The install notes (NOTES.txt); a named template so tests can render it with helm template. */}}
{{- define "mirrorcache.notes" -}}
{{- $host := include "mirrorcache.clientHost" . -}}
{{- $scheme := include "mirrorcache.scheme" . -}}
mirrorcache {{ .Chart.AppVersion }} is serving {{ $scheme }}://{{ $host }}
(storage: {{ .Values.storage.type }}{{ if eq .Values.storage.type "filesystem" }} on {{ if .Values.storage.filesystem.persistence.enabled }}a PersistentVolumeClaim{{ else }}an emptyDir{{ end }}{{ end }}; upstreams: {{ keys .Values.config.upstreams | sortAlpha | join ", " }}).

Check it:
  kubectl -n {{ .Release.Namespace }} port-forward svc/{{ include "mirrorcache.fullname" . }} 5000:{{ .Values.service.port }} &
  curl {{ if .Values.tls.enabled }}-k {{ end }}{{ $scheme }}://127.0.0.1:5000/readyz

Point clients at it. Nodes must be able to resolve and reach {{ $host }}
(cluster DNS names are not resolved by containerd or dockerd on the nodes: use an ingress,
a LoadBalancer, a NodePort or a fixed clusterIP there).
{{- if .Values.nodeConfig.enabled }}
The node-config DaemonSet writes containerd's hosts.toml on every node for:
{{ include "mirrorcache.nodeUpstreams" . | fromYamlArray | join ", " }} -> {{ $scheme }}://{{ .Values.nodeConfig.mirrorHost }}
{{- end }}

containerd ({{ .Values.nodeConfig.certsDir }}/<upstream>/hosts.toml, one directory per upstream):
{{- range keys .Values.config.upstreams | sortAlpha }}

  # {{ $.Values.nodeConfig.certsDir }}/{{ . }}/hosts.toml
  {{- include "mirrorcache.hostsToml" (dict "root" $ "name" . "mirror" (printf "%s://%s" $scheme $host) "skipVerify" false) | nindent 2 }}
{{- end }}

Docker (/etc/docker/daemon.json; Docker mirrors only Docker Hub this way):
{{- if .Values.tls.enabled }}

  { "registry-mirrors": ["https://{{ $host }}"] }
{{- else }}

  { "registry-mirrors": ["http://{{ $host }}"], "insecure-registries": ["{{ $host }}"] }
{{- end }}

podman / CRI-O / skopeo (/etc/containers/registries.conf):
{{- range keys .Values.config.upstreams | sortAlpha }}
{{- $up := index $.Values.config.upstreams . }}

  [[registry]]
  prefix = "{{ . }}"
  location = "{{ ternary "registry-1.docker.io" (trimPrefix "http://" (trimPrefix "https://" $up.url)) (eq . "docker.io") }}"
  [[registry.mirror]]
  location = "{{ $host }}/{{ . }}"
  {{- if not $.Values.tls.enabled }}
  insecure = true
  {{- end }}
{{- end }}
{{- if .Values.auth.enabled }}

Client authentication is on: clients log in with the users of Secret {{ .Values.auth.htpasswd.existingSecret | default .Values.auth.tokens.existingSecret }}
(containerd: a [host."..".header] Authorization entry; docker/podman: `login {{ $host }}`).
{{- end }}
{{- if .Values.policy.enabled }}

Policy: ConfigMap {{ include "mirrorcache.policyConfigMapName" . }} (key policy.yaml); edits are picked up within {{ .Values.policy.reloadInterval }} plus the kubelet's sync delay, without a restart.
{{- end }}

{{- end -}}
