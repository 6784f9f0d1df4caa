{{/*
Checks that a JSON schema cannot express, failing `helm install` / `helm template` with every problem
at once, each naming the value's path and the fix. values.schema.json has already rejected unknown keys
and wrong types; the hub checks the whole policy again at start-up (workbench.policy).
*/}}

{{- define "workbench.names" -}}
{{- $names := keys (. | default dict) | sortAlpha -}}
{{- if $names }}{{ join ", " $names }}{{ else }}(none defined){{ end -}}
{{- end -}}

{{/* Cross-references inside the platform policy (workbench.policy._reference_problems). */}}
{{- define "workbench.platformProblems" -}}
{{- $p := . -}}
{{- $problems := list -}}
{{- $images := $p.images | default dict -}}
{{- $gpuTypes := $p.gpu_types | default dict -}}
{{- $profiles := $p.profiles | default dict -}}
{{- $groups := $p.groups | default dict -}}
{{- $auth := $p.auth | default dict -}}
{{- range $name, $prof := $profiles -}}
{{- $prof = $prof | default dict -}}
{{- $image := $prof.image | default "base" -}}
{{- if not (hasKey $images $image) -}}
{{- $problems = append $problems (printf "platform.profiles.%s.image: unknown image '%s'; define it under 'platform.images' or use one of: %s" $name $image (include "workbench.names" $images)) -}}
{{- end -}}
{{- if $prof.gpu -}}
{{- if not (hasKey $gpuTypes $prof.gpu.type) -}}
{{- $problems = append $problems (printf "platform.profiles.%s.gpu.type: unknown GPU type '%s'; define it under 'platform.gpu_types' or use one of: %s" $name $prof.gpu.type (include "workbench.names" $gpuTypes)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $gname, $group := $groups -}}
{{- range $i, $prof := ($group.profiles | default list) -}}
{{- if not (hasKey $profiles $prof) -}}
{{- $problems = append $problems (printf "platform.groups.%s.profiles[%d]: unknown profile '%s'; define it under 'platform.profiles' or use one of: %s" $gname $i $prof (include "workbench.names" $profiles)) -}}
{{- end -}}
{{- end -}}
{{- if and $group.dask (($group.dask | default dict).gpu_workers) -}}
{{- if not (hasKey $gpuTypes ($group.dask.gpu_type | default "")) -}}
{{- $problems = append $problems (printf "platform.groups.%s.dask.gpu_type: gpu_workers needs a GPU type defined under 'platform.gpu_types' (one of: %s), got '%s'" $gname (include "workbench.names" $gpuTypes) ($group.dask.gpu_type | default "")) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- range $i, $g := ($auth.admin_groups | default list) -}}
{{- if not (hasKey $groups $g) -}}
{{- $problems = append $problems (printf "platform.auth.admin_groups[%d]: unknown group '%s'; define it under 'platform.groups' or use one of: %s" $i $g (include "workbench.names" $groups)) -}}
{{- end -}}
{{- end -}}
{{- $type := $auth.type | default "demo" -}}
{{- if hasKey $auth "client_secret" -}}
{{- $problems = append $problems "platform.auth.client_secret: secrets never go in the platform YAML: remove it, put the secret in a Kubernetes Secret named by hub.oauthClientSecret.existingSecret and name the hub's environment variable in platform.auth.client_secret_env" -}}
{{- end -}}
{{- if eq $type "demo" -}}
{{- if not $auth.demo_users -}}
{{- $problems = append $problems "platform.auth.demo_users: auth type 'demo' needs at least one demo user" -}}
{{- end -}}
{{- range $uname, $user := ($auth.demo_users | default dict) -}}
{{- range $i, $g := (($user | default dict).groups | default list) -}}
{{- if not (hasKey $groups $g) -}}
{{- $problems = append $problems (printf "platform.auth.demo_users.%s.groups[%d]: unknown group '%s'; define it under 'platform.groups' or use one of: %s" $uname $i $g (include "workbench.names" $groups)) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- else -}}
{{- if $auth.demo_users -}}
{{- $problems = append $problems (printf "platform.auth.demo_users: demo users are only allowed with auth type 'demo', not '%s'" $type) -}}
{{- end -}}
{{- $required := list "client_id" "client_secret_env" -}}
{{- if eq $type "generic-oauth" }}{{ $required = concat $required (list "authorize_url" "token_url" "userdata_url") }}{{ end -}}
{{- if eq $type "github" }}{{ $required = append $required "github_teams" }}{{ end -}}
{{- range $field := $required -}}
{{- if not (index $auth $field) -}}
{{- $problems = append $problems (printf "platform.auth.%s: auth type '%s' needs it (see `workbench check` for what to put there)" $field $type) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson $problems -}}
{{- end -}}

{{/* Chart values that only make sense together. */}}
{{- define "workbench.valuesProblems" -}}
{{- $v := .Values -}}
{{- $problems := list -}}
{{- $removed := list
      (list "hub.cookieSecret" (hasKey $v.hub "cookieSecret") "use secrets.cookieSecret, or nothing: it is generated once and kept")
      (list "hub.config" (hasKey $v.hub "config") "hub settings come from the platform policy (the `platform:` value); there is no free-form hub configuration")
      (list "hub.extraConfig" (hasKey $v.hub "extraConfig") "no Python in values: hub settings come from the platform policy (the `platform:` value)")
      (list "proxy.secretToken" (hasKey $v.proxy "secretToken") "use secrets.proxyToken, or nothing: it is generated once and kept")
      (list "singleuser" (hasKey $v "singleuser") "notebook pods are described by the platform policy: platform.profiles, platform.images and platform.storage")
-}}
{{- range $r := $removed -}}
{{- if index $r 1 -}}
{{- $problems = append $problems (printf "%s: removed; %s" (index $r 0) (index $r 2)) -}}
{{- end -}}
{{- end -}}
{{- $type := include "workbench.authType" . -}}
{{- if eq $type "demo" -}}
{{- if not (include "workbench.demoAuthAccepted" .) -}}
{{- $problems = append $problems (printf "platform.auth.type: 'demo' (one shared password) would be reachable from the network (proxy.service.type=%s, ingress.enabled=%v); configure SSO (auth.type generic-oauth or github), keep proxy.service.type=ClusterIP without an Ingress (kubectl port-forward), or set demoAuth.allowExposed=true on a closed lab network" $v.proxy.service.type $v.ingress.enabled) -}}
{{- end -}}
{{- else -}}
{{- if not $v.publicUrl -}}
{{- $problems = append $problems (printf "publicUrl: auth type '%s' needs the workbench's public URL (https://workbench.example.edu) for the OAuth callback <publicUrl>/hub/oauth_callback" $type) -}}
{{- end -}}
{{- if not $v.hub.oauthClientSecret.existingSecret -}}
{{- $problems = append $problems (printf "hub.oauthClientSecret.existingSecret: auth type '%s' needs the name of a Secret holding the OAuth client secret under key '%s' (kubectl create secret generic workbench-oauth --from-literal=%s=...)" $type $v.hub.oauthClientSecret.key $v.hub.oauthClientSecret.key) -}}
{{- end -}}
{{- end -}}
{{- if and (eq $v.hub.db.type "postgres") (not $v.hub.db.postgres.existingSecret) -}}
{{- $problems = append $problems "hub.db.postgres.existingSecret: hub.db.type 'postgres' needs the name of a Secret holding the database URL (postgresql+psycopg://user:password@host:5432/jupyterhub)" -}}
{{- end -}}
{{- if $v.quota.enabled -}}
{{- $url := $v.quota.db.url -}}
{{- $pvc := $v.quota.db.pvc | default dict -}}
{{- if kindIs "string" $url -}}
{{- if $url -}}
{{- $problems = append $problems "quota.db.url: name the Secret that holds the ledger's database URL, not the URL itself (values are stored in plain text): kubectl create secret generic workbench-quota-db --from-literal=url='postgresql+psycopg://...', then set quota.db.url.existingSecret=workbench-quota-db (and quota.db.url.key if the key is not 'url')" -}}
{{- end -}}
{{- else if $url.existingSecret -}}
{{- if or $pvc.size $pvc.storageClassName -}}
{{- $problems = append $problems (printf "quota.db.url and quota.db.pvc: both are set, but the ledger is either PostgreSQL (the URL in Secret '%s') or SQLite on a PersistentVolumeClaim (quota.db.pvc); remove quota.db.pvc to use PostgreSQL, or quota.db.url.existingSecret to use SQLite" $url.existingSecret) -}}
{{- end -}}
{{- else if and $url.key (ne $url.key "url") -}}
{{- $problems = append $problems (printf "quota.db.url.existingSecret: quota.db.url.key is '%s' but no Secret is named; set quota.db.url.existingSecret to the Secret holding the database URL (kubectl create secret generic workbench-quota-db --from-literal=%s=...), or remove quota.db.url to keep SQLite on a PersistentVolumeClaim" $url.key $url.key) -}}
{{- end -}}
{{- end -}}
{{- /* per-component operator values */ -}}
{{- $components := dict "hub" $v.hub "proxy" $v.proxy "gateway.api" $v.gateway.api "gateway.controller" $v.gateway.controller
      "gateway.proxy" $v.gateway.proxy "gateway.guard" $v.gateway.guard "quota" $v.quota "sessions" $v.sessions "rosters" $v.rosters -}}
{{- $chartVolumes := list "platform" "tmp" "hub-db" "ledger" -}}
{{- range $path := keys $components | sortAlpha -}}
{{- $c := index $components $path -}}
{{- range $name := keys ($c.extraEnv | default dict) | sortAlpha -}}
{{- if not (regexMatch "^[A-Za-z_][A-Za-z0-9_]*$" $name) -}}
{{- $problems = append $problems (printf "%s.extraEnv.%s: not an environment variable name (letters, digits and _, not starting with a digit)" $path $name) -}}
{{- end -}}
{{- if or (hasPrefix "WORKBENCH_" $name) (hasPrefix "JUPYTERHUB_" $name) (hasPrefix "JPY_" $name) (hasPrefix "CONFIGPROXY_" $name) -}}
{{- $problems = append $problems (printf "%s.extraEnv.%s: the chart sets the WORKBENCH_*, JUPYTERHUB_*, JPY_* and CONFIGPROXY_* variables itself; use the chart value that controls it (or the platform policy) instead" $path $name) -}}
{{- end -}}
{{- end -}}
{{- range $name := concat (keys ($c.extraVolumes | default dict)) (keys ($c.extraVolumeMounts | default dict)) | uniq | sortAlpha -}}
{{- if not (regexMatch "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$" $name) -}}
{{- $problems = append $problems (printf "%s.extraVolumes.%s: a volume name must be a DNS label (lower-case letters, digits and -)" $path $name) -}}
{{- end -}}
{{- end -}}
{{- range $name := keys ($c.extraVolumes | default dict) | sortAlpha -}}
{{- if has $name $chartVolumes -}}
{{- $problems = append $problems (printf "%s.extraVolumes.%s: the chart's own volume has this name (%s); choose another name" $path $name (join ", " $chartVolumes)) -}}
{{- end -}}
{{- end -}}
{{- range $name := keys ($c.extraVolumeMounts | default dict) | sortAlpha -}}
{{- if not (hasKey ($c.extraVolumes | default dict) $name) -}}
{{- $problems = append $problems (printf "%s.extraVolumeMounts.%s: no volume of that name; add it under %s.extraVolumes.%s (a volume source: secret, configMap, persistentVolumeClaim, ...)" $path $name $path $name) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* extra egress: on-premises services only */ -}}
{{- range $who := list "singleuser" "dask" -}}
{{- $egress := (index $v.networkPolicy $who).egress | default dict -}}
{{- range $name := keys $egress | sortAlpha -}}
{{- range $i, $cidr := (index $egress $name).cidrs -}}
{{- if eq $cidr "0.0.0.0/0" -}}
{{- $problems = append $problems (printf "networkPolicy.%s.egress.%s.cidrs[%d]: 0.0.0.0/0 would open every address (other users' pods, the cloud metadata service); name your on-premises networks, and set networkPolicy.%s.allowInternet=true for public addresses" $who $name $i $who) -}}
{{- else if hasPrefix "169.254." $cidr -}}
{{- $problems = append $problems (printf "networkPolicy.%s.egress.%s.cidrs[%d]: %s is link-local (the cloud metadata service at 169.254.169.254 hands out the node's credentials); it is never opened to users' pods" $who $name $i $cidr) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- /* the roster service and the placeholders refer to the policy */ -}}
{{- $platform := include "workbench.platform" . | fromJson -}}
{{- if and (eq (toString $v.rosters.enabled) "true") (not (include "workbench.courses" . | fromJsonArray)) -}}
{{- $problems = append $problems "rosters.enabled: true, but the policy has no course (a group of kind course) for the roster service to serve; add one to platform.groups, or leave rosters.enabled null (the service runs when there is a course)" -}}
{{- end -}}
{{- $placeholders := $v.scheduling.userPlaceholder.profiles | default dict -}}
{{- range $prof := keys $placeholders | sortAlpha -}}
{{- if not (hasKey ($platform.profiles | default dict) $prof) -}}
{{- $problems = append $problems (printf "scheduling.userPlaceholder.profiles.%s: unknown profile '%s'; use one of the policy's profiles: %s" $prof $prof (include "workbench.names" $platform.profiles)) -}}
{{- end -}}
{{- end -}}
{{- if and $v.scheduling.userPlaceholder.enabled (not $placeholders) -}}
{{- $problems = append $problems "scheduling.userPlaceholder.profiles: userPlaceholder is enabled but names no profile; set {<profile>: <replicas>}, e.g. scheduling.userPlaceholder.profiles.h100-x1=2" -}}
{{- end -}}
{{- if and $v.prePuller.continuous.enabled (not $platform.gpu_types) -}}
{{- $problems = append $problems "prePuller.continuous.enabled: the pre-puller pulls the images of GPU profiles on their GPU type's nodes, but the policy has no gpu_types; disable it" -}}
{{- end -}}
{{- if and $v.ingress.enabled (not $v.ingress.host) -}}
{{- $problems = append $problems "ingress.host: ingress.enabled needs the host name (workbench.example.edu)" -}}
{{- end -}}
{{- with $v.hub.subdomainHost -}}
{{- $sub := urlParse . -}}
{{- $subHost := regexReplaceAll ":[0-9]+$" $sub.host "" -}}
{{- if or (not (has $sub.scheme (list "http" "https"))) (not $subHost) (not (has $sub.path (list "" "/"))) $sub.query $sub.fragment -}}
{{- $problems = append $problems (printf "hub.subdomainHost: %q is not an origin (scheme://host[:port], nothing after); set it to the hub's origin, e.g. https://workbench.example.edu (users at https://<user>.workbench.example.edu)" .) -}}
{{- else if regexMatch "^[0-9.]+$" $subHost -}}
{{- $problems = append $problems (printf "hub.subdomainHost: %q is an IP address, which has no subdomains; use the DNS name whose wildcard *.<name> points at the proxy, e.g. https://workbench.example.edu" .) -}}
{{- end -}}
{{- if and $v.ingress.enabled $v.ingress.host (ne $subHost $v.ingress.host) -}}
{{- $problems = append $problems (printf "hub.subdomainHost: its host %q is not ingress.host %q; the Ingress serves <ingress.host> and *.<ingress.host>: make them the same name" $subHost $v.ingress.host) -}}
{{- end -}}
{{- if $v.publicUrl -}}
{{- $pub := urlParse $v.publicUrl -}}
{{- if or (ne $pub.scheme $sub.scheme) (ne $pub.host $sub.host) -}}
{{- $problems = append $problems (printf "hub.subdomainHost: %q and publicUrl %q are different origins; the hub lives at subdomainHost: set publicUrl to %s://%s (or leave it empty)" . $v.publicUrl $sub.scheme $sub.host) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- toJson $problems -}}
{{- end -}}

{{- define "workbench.validate" -}}
{{- $platform := include "workbench.platform" . | fromJson -}}
{{- $problems := concat (include "workbench.valuesProblems" . | fromJsonArray) (include "workbench.platformProblems" $platform | fromJsonArray) -}}
{{- if $problems -}}
{{- fail (printf "\n\nworkbench: invalid values (%d problem%s)\n  - %s\n" (len $problems) (ternary "" "s" (eq (len $problems) 1)) (join "\n  - " $problems)) -}}
{{- end -}}
{{- end -}}
