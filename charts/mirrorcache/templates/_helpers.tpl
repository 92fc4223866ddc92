{{/* Names and labels. */}}
{{- define "mirrorcache.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "mirrorcache.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains (include "mirrorcache.name" .) .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name (include "mirrorcache.name" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "mirrorcache.selectorLabels" -}}
app.kubernetes.io/name: {{ include "mirrorcache.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "mirrorcache.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "mirrorcache.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "mirrorcache.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "mirrorcache.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "mirrorcache.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* Where the pod sees its files (one place: config, volumes and tests agree). */}}
{{- define "mirrorcache.configDir" -}}/etc/mirrorcache/config{{- end -}}
{{- define "mirrorcache.policyDir" -}}/etc/mirrorcache/policy{{- end -}}
{{- define "mirrorcache.authDir" -}}/etc/mirrorcache/auth{{- end -}}
{{- define "mirrorcache.tlsDir" -}}/etc/mirrorcache/tls{{- end -}}
{{- define "mirrorcache.upstreamSecretDir" -}}/etc/mirrorcache/upstreams{{- end -}}

{{- define "mirrorcache.tlsSecretName" -}}
{{- if .Values.tls.certManager.enabled -}}
{{- printf "%s-tls" (include "mirrorcache.fullname" .) -}}
{{- else -}}
{{- .Values.tls.existingSecret -}}
{{- end -}}
{{- end -}}

{{- define "mirrorcache.policyConfigMapName" -}}
{{- default (printf "%s-policy" (include "mirrorcache.fullname" .)) .Values.policy.existingConfigMap -}}
{{- end -}}

{{- define "mirrorcache.scheme" -}}
{{- if .Values.tls.enabled -}}https{{- else -}}http{{- end -}}
{{- end -}}

{{/* "true" when replicas can share the cache (no such storage in this version yet). */}}
{{- define "mirrorcache.sharedStorage" -}}
{{- if eq .Values.storage.type "s3" -}}true{{- end -}}
{{- end -}}

{{/*
Refuse values this mirrorcache version cannot serve, with a message saying why.
Included by the ConfigMap, so every render checks it.
*/}}
{{- define "mirrorcache.validate" -}}
{{- $v := .Values -}}
{{- if eq $v.storage.type "s3" -}}
{{- fail "storage.type=s3 requires a mirrorcache version with S3 storage; this chart's mirrorcache (appVersion 0.1.0) supports storage.type=filesystem only" -}}
{{- end -}}
{{- if $v.cluster.enabled -}}
{{- fail "cluster.enabled requires a mirrorcache version with cluster peers; not supported by appVersion 0.1.0" -}}
{{- end -}}
{{- if $v.mirroring -}}
{{- fail "mirroring entries require a mirrorcache version with mirroring; not supported by appVersion 0.1.0: set mirroring: []" -}}
{{- end -}}
{{- if $v.pins -}}
{{- fail "pins require a mirrorcache version with pins; not supported by appVersion 0.1.0: set pins: []" -}}
{{- end -}}
{{- if and (gt (int $v.replicaCount) 1) (not (include "mirrorcache.sharedStorage" .)) -}}
{{- fail (printf "replicaCount=%d needs shared storage: a filesystem cache (with its sqlite metadata) belongs to one pod; use replicaCount: 1 or storage.type=s3" (int $v.replicaCount)) -}}
{{- end -}}
{{- if and $v.autoscaling.enabled (not (include "mirrorcache.sharedStorage" .)) -}}
{{- fail "autoscaling.enabled needs shared storage (storage.type=s3): a filesystem cache belongs to one pod" -}}
{{- end -}}
{{- if and $v.tls.enabled (not $v.tls.existingSecret) (not $v.tls.certManager.enabled) -}}
{{- fail "tls.enabled needs tls.existingSecret (a kubernetes.io/tls Secret) or tls.certManager.enabled" -}}
{{- end -}}
{{- if and $v.tls.certManager.enabled (not $v.tls.certManager.issuerRef.name) -}}
{{- fail "tls.certManager.enabled needs tls.certManager.issuerRef.name" -}}
{{- end -}}
{{- if and $v.auth.enabled (not $v.auth.htpasswd.existingSecret) (not $v.auth.tokens.existingSecret) -}}
{{- fail "auth.enabled needs auth.htpasswd.existingSecret or auth.tokens.existingSecret" -}}
{{- end -}}
{{- if and $v.nodeConfig.enabled (not $v.nodeConfig.mirrorHost) -}}
{{- fail "nodeConfig.enabled needs nodeConfig.mirrorHost: the address containerd on the nodes uses to reach the mirror (nodes do not resolve cluster DNS)" -}}
{{- end -}}
{{- if and $v.config.defaultUpstream (not (hasKey $v.config.upstreams $v.config.defaultUpstream)) -}}
{{- fail (printf "config.defaultUpstream %q is not one of config.upstreams" $v.config.defaultUpstream) -}}
{{- end -}}
{{- end -}}

{{/* The mirrorcache config file. */}}
{{- define "mirrorcache.config" -}}
{{- $v := .Values -}}
{{- $upstreams := dict -}}
{{- range $i, $name := keys $v.config.upstreams | sortAlpha -}}
{{- $up := omit (index $v.config.upstreams $name) "credentials" -}}
{{- with (index $v.config.upstreams $name).credentials -}}
{{- $_ := set $up "username" .username -}}
{{- if eq (default "file" .as) "env" -}}
{{- $_ := set $up "password_env" (printf "MIRRORCACHE_UPSTREAM_%d_PASSWORD" $i) -}}
{{- else -}}
{{- $_ := set $up "password_file" (printf "%s/%d/password" (include "mirrorcache.upstreamSecretDir" $) $i) -}}
{{- end -}}
{{- end -}}
{{- $_ := set $upstreams $name $up -}}
{{- end -}}
{{- $cfg := dict
  "listen" (printf "0.0.0.0:%d" (int $v.config.port))
  "workers" (int $v.config.workers)
  "event_loop" $v.config.eventLoop
  "shutdown_grace" $v.config.shutdownGrace
  "storage" (dict "filesystem" (dict "path" $v.storage.filesystem.path))
  "upstreams" $upstreams
  "log" (dict "level" $v.config.log.level "format" $v.config.log.format) -}}
{{- if $v.config.defaultUpstream -}}
{{- $_ := set $cfg "default_upstream" $v.config.defaultUpstream -}}
{{- end -}}
{{- if $v.policy.enabled -}}
{{- $_ := set $cfg "policy" (dict "file" (printf "%s/policy.yaml" (include "mirrorcache.policyDir" .)) "reload_interval" $v.policy.reloadInterval) -}}
{{- end -}}
{{- if $v.auth.enabled -}}
{{- $auth := dict "enabled" true "realm" $v.auth.realm "max_failed_logins" (int $v.auth.maxFailedLogins) "failed_login_window" $v.auth.failedLoginWindow -}}
{{- if $v.auth.htpasswd.existingSecret -}}
{{- $_ := set $auth "htpasswd" (printf "%s/htpasswd" (include "mirrorcache.authDir" .)) -}}
{{- end -}}
{{- if $v.auth.tokens.existingSecret -}}
{{- $_ := set $auth "tokens_file" (printf "%s/tokens" (include "mirrorcache.authDir" .)) -}}
{{- end -}}
{{- if $v.auth.groups -}}
{{- $_ := set $auth "groups" $v.auth.groups -}}
{{- end -}}
{{- $_ := set $cfg "auth" $auth -}}
{{- end -}}
{{- if $v.tls.enabled -}}
{{- $_ := set $cfg "tls" (dict "cert" (printf "%s/tls.crt" (include "mirrorcache.tlsDir" .)) "key" (printf "%s/tls.key" (include "mirrorcache.tlsDir" .))) -}}
{{- end -}}
{{- toYaml (mergeOverwrite $cfg $v.config.extra) -}}
{{- end -}}

{{/* The policy file (policy.enabled without existingConfigMap). */}}
{{- define "mirrorcache.policy" -}}
{{- toYaml (dict "default" .Values.policy.default "rules" .Values.policy.rules) -}}
{{- end -}}

{{/* host:port clients use in NOTES (ingress host if any, else the Service DNS name). */}}
{{- define "mirrorcache.clientHost" -}}
{{- if and .Values.ingress.enabled .Values.ingress.hosts -}}
{{- (index .Values.ingress.hosts 0).host -}}
{{- else -}}
{{- printf "%s.%s.svc:%d" (include "mirrorcache.fullname" .) .Release.Namespace (int .Values.service.port) -}}
{{- end -}}
{{- end -}}

{{/* The upstreams nodeConfig writes hosts.toml for. */}}
{{- define "mirrorcache.nodeUpstreams" -}}
{{- if .Values.nodeConfig.upstreams -}}
{{- toYaml .Values.nodeConfig.upstreams -}}
{{- else -}}
{{- toYaml (keys .Values.config.upstreams | sortAlpha) -}}
{{- end -}}
{{- end -}}

{{/* containerd hosts.toml for upstream $name, the mirror at $mirror ("scheme://host:port"). */}}
{{- define "mirrorcache.hostsToml" -}}
{{- $up := index .root.Values.config.upstreams .name -}}
server = {{ (ternary "https://registry-1.docker.io" $up.url (eq .name "docker.io")) | quote }}

[host.{{ .mirror | quote }}]
  capabilities = ["pull", "resolve"]
{{- if .skipVerify }}
  skip_verify = true
{{- end }}
{{- end -}}
